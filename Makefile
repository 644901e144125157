# Two commands a new user needs: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch is pinned before anything else so that no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m ruff check adafuse_compile tests tools examples benchmarks
	$(PY) tools/import_graph.py
	$(PY) -m pytest -q

# adafuse-bench with its defaults (about 5 minutes on 2 cores), then the op and merge micro-benchmarks.
bench: $(STAMP)
	mkdir -p build
	$(VENV)/bin/adafuse-bench --json build/bench.json --plot build/bench.png
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
