# recallprune: set-up, demo, tests, lint, benchmarks, the GPU check.
# `make demo` and `make test` do all the set-up on a fresh machine; a second run is quick.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEPS_STAMP := $(VENV)/.stamp-deps
EXT_STAMP := $(VENV)/.stamp-ext
EXT_SOURCES := $(shell find csrc -type f) setup.py

.PHONY: setup demo test lint format bench gpu-check clean

setup: $(EXT_STAMP)

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	# The build requirements (pyproject.toml): the build runs without isolation, against this torch.
	$(PIP) install --quiet setuptools wheel ninja
	# The package, editable, with the study's extra and the test tools; the extension is built
	# in place below (incrementally).
	RECALLPRUNE_BUILD_EXT=0 $(PIP) install --quiet --no-build-isolation -e '.[study,test]'
	touch $@

# ninja keeps the objects under build/, so only changed sources recompile.
$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py --quiet build_ext --inplace
	touch $@

# The default study (digits, LeNet-300-100, 10 seeds, 4 criteria + control, 18 rounds).
# Rerunning resumes: finished runs are reused.
demo: setup
	$(VENV)/bin/recallprune study --out runs/demo-digits-mlp

test: setup lint
	$(PY) -m pytest -q

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The CPU once per instruction set it has (default, AVX2, AVX-512), with torch's default pages
# and again with huge pages (-thp files: ratios that page placement does not move), the GPU
# once when present.
bench: setup
	$(PY) benchmarks/bench_optimizer.py --capability all
	$(PY) benchmarks/bench_confusion.py --capability all
	$(PY) benchmarks/bench_stacked_linear.py --capability all --threads 1
	$(PY) benchmarks/bench_optimizer.py --capability all --device cpu --huge-pages
	$(PY) benchmarks/bench_confusion.py --capability all --device cpu --huge-pages

# On a machine with an NVIDIA GPU (not part of `make test`): build for that GPU with the
# Python that holds torch, run the CUDA tests, compute-sanitizer and both benchmarks on CUDA,
# then a pass/fail summary. See tools/gpu_check.sh for its settings.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf build recallprune/*.so $(EXT_STAMP)
