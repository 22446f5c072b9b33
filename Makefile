# Quick start: `make demo` (the `reflora bench` default suite, results/ gets the JSON and PNGs),
# `make test` and `make docs`. Each creates .venv with the system python3 (needs python3-venv) if
# it is missing and (re)installs the project with every extra (`.[dev]`: all, test, docs)
# whenever pyproject.toml changes. Extra pytest arguments: `make test PYTEST_ARGS="-k func -x"`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.reflora-installed
PYTEST_ARGS ?=
# pytest-xdist workers: one per core; work stealing (an idle worker takes tests queued on a busy
# one), so that a few long tests do not leave a worker idle at the end of the phase
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)
XDIST  := -n $(JOBS) --dist worksteal
# pytest's exit code 5 (no test selected, e.g. by PYTEST_ARGS in one phase) is not a failure
OK5    := || test $$? -eq 5

# The inner loop (under a minute on 2 cores): the golden trajectories, the configuration and
# layout checks, attach / reflora.func / diagnostics and the core modules behind attach (pairs,
# step, optimizers, runner, cache, handle, checkpoint), few hypothesis examples, no compile, no
# multi-process tests. `make test` runs everything.
FAST_TESTS ?= tests/core/test_golden.py tests/core/test_config.py tests/core/test_layout.py \
	tests/frontends/test_attach.py tests/frontends/test_func.py tests/core/test_functional_errors.py \
	tests/core/test_diagnostics.py tests/core/test_pairs.py tests/core/test_step.py tests/core/test_optimizers.py \
	tests/core/test_runner.py tests/core/test_cache.py tests/core/test_handle.py tests/core/test_checkpoint.py

.PHONY: demo test test-fast docs install clean

demo: $(STAMP)
	$(PY) -m reflora bench --out results

# Two phases: everything but the multi-process tests on $(JOBS) pytest-xdist workers, then the
# multi-process tests (marker `distributed`: they start their own processes) one at a time.
test: $(STAMP)
	$(PY) -m pytest $(XDIST) --phase=parallel $(PYTEST_ARGS) $(OK5)
	$(PY) -m pytest --phase=serial $(PYTEST_ARGS) $(OK5)

test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q $(XDIST) -m "not slow and not compile and not distributed" $(FAST_TESTS) $(PYTEST_ARGS)

# The documentation site (Sphinx + MyST); -W -n: every warning and every broken reference fails.
docs: $(STAMP)
	$(PY) -m sphinx -W -n --keep-going -q -b html docs docs/_build/html

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis docs/_build
