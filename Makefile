VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench-quality bench-serve bench-peers

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

# infinity-emb pins sentence-transformers < 4 (the project has 6): its own virtual environment, with the same
# CPU torch so that nothing large is downloaded.
INFINITY_VENV ?= /tmp/qadistill-infinity-venv
bench-peers: install
	$(PY) -m pip install -q -e '.[dev,bench]'
	test -x $(INFINITY_VENV)/bin/infinity_emb || (python3 -m venv $(INFINITY_VENV) && \
		$(INFINITY_VENV)/bin/pip install -q torch==2.13.0 && \
		$(INFINITY_VENV)/bin/pip install -q 'infinity-emb[server,torch]==0.0.78')
	$(PY) benchmarks/peers.py --infinity $(INFINITY_VENV)/bin/infinity_emb --write
