# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the project into it when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m piperc.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/compile_time.py

clean:
	rm -rf $(VENV) out
