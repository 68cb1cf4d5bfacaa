# `make test` and `make train` bootstrap their own virtual environment from a bare Python >= 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test train bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The training loop (train/) is the next piece of work; until it lands this target says so.
train: $(STAMP)
	@if [ -f train/__main__.py ]; then $(PY) -m train --config configs/tiny.yaml; \
	else echo "make train: the training loop (train/) is not built yet; see README 'Status'"; exit 2; fi

bench: $(STAMP)
	$(PY) bench/mesh_step.py

clean:
	rm -rf $(VENV) .pytest_cache
