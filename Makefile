# Every target does its own set-up on a fresh machine: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras, redone whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-data
	$(PY) -m jdrop --out out

test: $(VENV)/.installed-dev
	$(PY) -m ruff check jdrop tests benchmarks
	$(PY) -m mypy
	$(PY) -m mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest -q

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks

docs: $(VENV)/.installed-dev
	$(PY) -m mkdocs build --strict --site-dir site

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check jdrop tests benchmarks

clean:
	rm -rf $(VENV) out build dist site .pytest_cache
