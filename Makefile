# Quick start: `make demo` (the `reflora bench` default suite, results/ gets the JSON and PNGs)
# and `make test`. Both create .venv with the system python3 if it is
# missing and (re)install the project with all extras whenever pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reflora-installed
PYTEST_ARGS ?=

# The inner loop (under 2 minutes on 2 cores): the golden trajectories, the configuration and
# layout checks, attach / reflora.func / diagnostics, few hypothesis examples, no compile, no
# multi-process tests. `make test` runs everything.
FAST_TESTS ?= tests/test_golden.py tests/test_config.py tests/test_layout.py tests/test_attach.py \
	tests/test_func.py tests/test_functional_errors.py tests/test_diagnostics.py

.PHONY: demo test test-fast install clean

demo: $(STAMP)
	$(PY) -m reflora bench --out results

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -m "not slow and not compile and not distributed" $(FAST_TESTS) $(PYTEST_ARGS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e ".[all,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
