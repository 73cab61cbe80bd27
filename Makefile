# Every target builds .venv on first use; torch is pinned first so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build through a looser range.
PY ?= python3
# bash: the demo quotes multi-line prompts as $$'...\n...'
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# llama-cpp-python (the engine's llama.cpp backend) builds llama.cpp from source: only the library,
# tuned for this machine's CPU.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON

.PHONY: demo test serve bench bench-llamacpp venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e '.[llamacpp]'
	touch $(STAMP)

venv: $(STAMP)

# The dLLM completes a function and fills a middle; its AR twin does the same on the same engine, so
# the [tokens, NFE, TPF, tok/s] lines compare them directly. The prompt stops before its last newline:
# the tokenizer merges a newline with the next indentation, so the model writes both (eval/generate.py).
DEMO_PROMPT := def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same forwards and backwards."""
DEMO_PREFIX := def mean(values):\n    total = 0\n    for v in values:\n        total +=
DEMO_SUFFIX := \n    return total / len(values)\n
demo: $(STAMP)
	@echo "== unmask-coder (block diffusion): complete a function =="
	$(BIN)/unmask generate --max-tokens 64 $$'$(DEMO_PROMPT)'
	@echo "== unmask-coder-ar (AR twin, same engine): the same prompt =="
	$(BIN)/unmask generate --model models/unmask-coder-ar --max-tokens 64 $$'$(DEMO_PROMPT)'
	@echo "== unmask-coder: fill in the middle =="
	$(BIN)/unmask generate --max-tokens 16 --stop $$'\n' --suffix $$'$(DEMO_SUFFIX)' $$'$(DEMO_PREFIX)'
	@echo "== unmask-coder-ar: fill in the middle =="
	$(BIN)/unmask generate --model models/unmask-coder-ar --max-tokens 16 --stop $$'\n' --suffix $$'$(DEMO_SUFFIX)' $$'$(DEMO_PREFIX)'

test: $(STAMP)
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/unmask serve

bench: $(STAMP)
	mkdir -p bench/results
	set -o pipefail; $(BIN)/unmask bench --json bench/results/bench.json | tee bench/results/bench.txt

# unmask beside llama.cpp (bench/llamacpp.py). LLAMA_CPP=DIR names a build with llama-server and
# llama-bench in it; without it, llama.cpp is built once from the llama-cpp-python sdist under
# runs/llamacpp (about 13 minutes on 2 cores).
LLAMA_CPP ?=
bench-llamacpp: $(STAMP)
	mkdir -p bench/results
	set -o pipefail; $(BIN)/python bench/llamacpp.py $(if $(LLAMA_CPP),--llama-cpp $(LLAMA_CPP),--build runs/llamacpp) \
		--work runs/llamacpp/work --json bench/results/llamacpp.json | tee bench/results/llamacpp.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
