# Quick start: `make demo` (the `reflora bench` default suite, results/ gets the JSON and PNGs)
# and `make test`. Both create .venv with the system python3 if it is
# missing and (re)install the project with all extras whenever pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reflora-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean

demo: $(STAMP)
	$(PY) -m reflora bench --out results

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e ".[all,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
