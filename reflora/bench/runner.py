"""Run one (task, method, lr, seed) and measure it."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from reflora.bench.methods import LORA_OPTIONS, MethodUnavailable, make_optimizer
from reflora.config import UnsupportedOptimizerError
from reflora.diagnostics import diagnose
from reflora.bench.tasks import Task

__all__ = ["Run", "run_one", "steps_to"]


@dataclass
class Run:
    task: str
    method: str
    lr: float
    seed: int
    losses: list[float] = field(default_factory=list)
    metric: float = float("nan")  # on the task's test split
    val_metric: float = float("nan")  # on its validation split (where --full chooses each method's rate)
    ms_per_step: float = float("nan")
    state_mb: float = float("nan")
    error: str = ""
    path: str = "eager"  # "eager": one run, attach on torch.optim; "vmap": a member of a vmapped sweep
    seconds: float = float("nan")  # wall time of the whole run (build, train, evaluate)
    # (step, mean over pairs of |log(||A||_F / ||B||_F)|) after that step, from reflora.diagnostics
    imbalance: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10% of steps (single-batch losses are noisy)."""
        if not self.losses:
            return float("nan")
        k = max(1, len(self.losses) // 10)
        return float(statistics.fmean(self.losses[-k:]))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        return d


def _ema(xs: list[float], beta: float = 0.8) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def steps_to(losses: list[float], target: float) -> int | None:
    """First step whose smoothed (EMA 0.8) training loss is at or below ``target``."""
    if not math.isfinite(target):
        return None
    return next((i + 1 for i, v in enumerate(_ema(losses)) if v <= target), None)


def _state_mb(opt, handle) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    if handle is not None:
        for S, S_inv in handle.cached_metrics.values():
            total += (S.numel() + S_inv.numel()) * S.element_size()
    return total / 2**20


def _mean_abs_imbalance(model) -> float:
    """Mean over the model's pairs of ``|log(||A||_F / ||B||_F)|`` (untimed; plain LoRA too)."""
    rows = diagnose(model).values()
    return float(statistics.fmean(abs(r["imbalance"]) for r in rows))


def run_one(task: Task, method: str, lr: float, seed: int, steps: int, attach_kw: dict | None = None,
            optimizer: str = "adamw") -> Run:
    """Train ``task``'s model with ``method`` (``attach_kw``: extra :func:`reflora.attach` options
    of a RefLoRA method; ``optimizer``: the base optimizer, see
    :data:`reflora.bench.methods.BASE_OPTIMIZERS`) and score it. A schedule-free optimizer is
    switched to ``eval()`` (its averaged point) for scoring."""
    t_start = time.perf_counter()
    run = Run(task.name, method, lr, seed)
    torch.manual_seed(seed)
    try:
        model = task.build(seed, **LORA_OPTIONS.get(method, {}))
        model.train()
        opt, handle = make_optimizer(method, model, lr, optimizer=optimizer, shared_lr=task.shared_lr, **(attach_kw or {}))
    except (MethodUnavailable, UnsupportedOptimizerError) as exc:  # n/a, with the reason (SOAP's parameter space)
        run.error = str(exc)
        return run
    times = []
    batches = task.batches(seed)
    every = max(1, steps // 40)
    for step in range(steps):
        batch = next(batches)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        value = float(loss.detach())
        run.losses.append(value)
        if not math.isfinite(value):
            run.error = "diverged (non-finite loss)"
            break
        if (step + 1) % every == 0 or step == 0:
            run.imbalance.append((step + 1, _mean_abs_imbalance(model)))
    run.ms_per_step = 1e3 * statistics.median(times[1:] or times)
    run.state_mb = _state_mb(opt, handle)
    if not run.error:
        if callable(getattr(opt, "eval", None)):  # schedule-free: score the averaged point x
            opt.eval()
        run.metric = task.evaluate(model, seed, "test")
        run.val_metric = task.evaluate(model, seed, "val")
    run.seconds = time.perf_counter() - t_start
    return run
