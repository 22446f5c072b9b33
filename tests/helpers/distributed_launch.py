"""Launch real multi-process runs from a test: N Python processes, a file rendezvous, hard timeouts.

Each rank runs ``tests/helpers/distributed_worker.py <scenario> <json args>`` with ``RANK`` / ``WORLD_SIZE``
and ``REFLORA_STORE`` (a ``file://`` rendezvous in a fresh temporary folder: no TCP store port to
race for; gloo opens its own ephemeral ports). A rank writes what it measured to
``rank<k>.pt``; the test asserts on those. A run that exceeds its timeout is killed (the whole
process group of every rank) and reported with the ranks' logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def _env(rank: int, world: int, store: str, out: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        REFLORA_STORE=store, REFLORA_OUT=out, OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra or {})
    return env


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def run_command(cmds: list[list[str]], envs: list[dict[str, str]], logs: list[Path], timeout: float) -> None:
    """Start every command, wait for all with one deadline, kill all on timeout or first failure."""
    procs = []
    for cmd, env, log in zip(cmds, envs, logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run exceeded {timeout:.0f}s")
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = bad[0]
                time.sleep(2.0)  # let the other ranks print their side of the failure
                break
            time.sleep(0.05)
    except TimeoutError as e:
        _kill(procs)
        raise AssertionError(f"{e}; logs:\n" + "\n".join(f"--- rank {i}\n{_tail(log)}" for i, log in enumerate(logs))) from None
    _kill(procs)
    codes = [p.returncode for p in procs]
    if failed is not None or any(c != 0 for c in codes):
        i = failed if failed is not None else next(i for i, c in enumerate(codes) if c != 0)
        raise AssertionError(
            f"rank {i} exited with {codes[i]} (all: {codes}); its log:\n{_tail(logs[i])}\n"
            + "\n".join(f"--- rank {k}\n{_tail(log, 1500)}" for k, log in enumerate(logs) if k != i)
        )


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def launch(scenario: str, world_size: int, args: dict[str, Any] | None = None, *, timeout: float = 120,
           workdir: str | None = None, extra_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` processes; returns every rank's result dict."""
    tmp = workdir or tempfile.mkdtemp(prefix="reflora-dist-")
    run = tempfile.mkdtemp(prefix="run-", dir=tmp)
    store = os.path.join(run, "store")
    cmds = [[sys.executable, str(WORKER), scenario, json.dumps(args or {})] for _ in range(world_size)]
    envs = [_env(r, world_size, store, run, extra_env) for r in range(world_size)]
    logs = [Path(run) / f"rank{r}.log" for r in range(world_size)]
    run_command(cmds, envs, logs, timeout)
    return [torch.load(Path(run) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
