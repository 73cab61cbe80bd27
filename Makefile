# Every target builds .venv on first use; torch is pinned first so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build through a looser range.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test serve bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The dLLM, then its AR twin on the same engine for comparison (both are version-0 models: see
# models/*/README.md for what they can and cannot do yet).
DEMO_PROMPT := def fibonacci(n):
demo: $(STAMP)
	@echo "== unmask-coder (block diffusion), 64 tokens in 16 steps =="
	$(BIN)/unmask generate --max-tokens 64 --steps 16 "$(DEMO_PROMPT)"
	@echo "== unmask-coder-ar (AR twin), one token per step =="
	$(BIN)/unmask generate --model models/unmask-coder-ar --max-tokens 64 "$(DEMO_PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/unmask serve

bench: $(STAMP)
	$(BIN)/unmask bench --json bench/results/bench.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
