"""Shared test setup: hypothesis profiles, threads per process, the device fixture.

The helpers every folder imports (tests/helpers: model builders, hypothesis strategies, the
multi-process launcher) are put on ``sys.path`` here. Under pytest-xdist each worker gets its
share of the cores, and the tests that start their own processes (marker ``distributed``) run
after the others (``make test``), so that their hard timeouts see an idle machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# two threads per process at most, and the cores shared between pytest-xdist's workers. Under
# xdist the processes the tests start (the bench CLI, the examples) get the same share, and idle
# OpenMP threads sleep instead of spinning: on oversubscribed cores spinning threads slowed such
# runs down by 5-10x
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.register_profile(  # make test-fast: the inner loop
    "fast",
    deadline=None,
    max_examples=8,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

torch.set_num_threads(_THREADS)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--phase", choices=("parallel", "serial"), default=None,
        help="make test's two phases: 'parallel' leaves out the multi-process tests (marker distributed), "
             "'serial' runs only those; without it, everything",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    phase = config.getoption("--phase")
    if phase is None:
        return
    serial = phase == "serial"
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("distributed") is not None) == serial else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
