# `make test` and `make train` bootstrap their own virtual environment from a bare Python >= 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-pod train generate bench venv clean

# glibc's malloc on transparent huge pages (train/host.py; the python entry points re-execute
# themselves with it): XLA:CPU's per-step buffers then fault 2 MiB at a time, not 4 KiB
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# modules are compiled to bytecode once, on first import (see --no-compile below)
unexport PYTHONDONTWRITEBYTECODE

# --no-compile: pip would byte-compile all ~14,000 installed modules (40 of its 83 s here), most of
# which nothing imports (transformers' other models, sympy); Python compiles the ones imported on
# first use instead, so the recipes below let it write them (PYTHONDONTWRITEBYTECODE unset).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# whole test files per worker (their module fixtures are built once), one worker per core, <= 4
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile

# the planner against libtpu on a reduced-depth pod config (~7-10 min, ~15 GB of host memory; needs libtpu)
test-pod: $(STAMP)
	$(PY) -m pytest -m pod

train: $(STAMP)
	$(PY) -m train --config configs/tiny.yaml

# after `make train`: text from the trained tiny model (its newest checkpoint)
generate: $(STAMP)
	$(PY) -m infer --run runs/tiny --prompt "ROMEO:" --prompt "To be, or not" --max-new-tokens 80

bench: $(STAMP)
	$(PY) bench/mesh_step.py
	$(PY) bench/gmm.py
	$(PY) bench/train_speed.py --steps 3 --warmup 1 --batch 8 --seq 128
	$(PY) bench/train_speed.py --steps 3 --warmup 1 --batch 8 --seq 128 --shape --optim adamw --devices 1
	$(PY) bench/decode_speed.py --torch-threads 1

clean:
	rm -rf $(VENV) .pytest_cache
