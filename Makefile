VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench-quality bench-serve

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

run: install
	$(VENV)/bin/qadistill run

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check app workers tests benchmarks migrations

bench-quality: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/quality.py

bench-serve: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) benchmarks/serve.py
