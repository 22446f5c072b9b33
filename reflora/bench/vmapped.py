"""The stability sweep as one ``torch.func.vmap``'ed program per (method, seed).

Every learning rate of a sweep starts from the same model and sees the same batches, so the
members differ only in their optimizer state's ``lr``: stack ``N`` copies of the trainable
parameters, give :mod:`reflora.func`'s AdamW one rate per member (``vmap(opt.init)(params,
lrs)``) and train all ``N`` in one program (``vmap(grad_and_value(loss))`` and
``vmap(opt.update)``). The frozen weights and the batch are shared (``in_dims=None``).

Which methods: plain LoRA and the four RefLoRA modes (``reflora.func`` has them all, tested
equal to ``reflora.attach`` on ``torch.optim.AdamW``). LoRA+ and PEFT's Riemannian optimizer are
``torch.optim`` objects with no functional form and run one by one. Which tasks: those whose
model is vmappable (``Task.vmappable``): the ViT and the GCN; MiniLM's step is compute-bound
(one vmapped program would not be faster on 2 cores) and runs one by one.

A program that raises (for example LAPACK refusing a diverged member's non-finite Gram) is
re-run member by member through :func:`reflora.bench.runner.run_one`, and says so.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import reflora
from reflora.bench.methods import MODES
from reflora.bench.runner import Run, run_one
from reflora.bench.tasks import Task

__all__ = ["VMAP_METHODS", "vmapped_sweep"]

VMAP_METHODS = ("lora", *MODES)
"""The bench methods with a :mod:`reflora.func` form (the rest always run one by one)."""


class _LossModule(nn.Module):
    """``forward(batch) = task.loss(model, batch)``, so ``functional_call`` sees one module."""

    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch):
        return self._loss(self.model, batch)


def _optimizer(method: str, pairs: tuple, lr: float) -> reflora.func.FunctionalOptimizer:
    """The :mod:`reflora.func` twin of :func:`reflora.bench.methods.make_optimizer`'s ``method``."""
    if method == "lora":
        return reflora.func.adamw(None, lr=lr, weight_decay=0.0)
    variant, space = MODES[method]
    return reflora.func.adamw(pairs, lr=lr, weight_decay=0.0, variant=variant, space=space)


def _imbalance(params: dict[str, torch.Tensor], keys: list[tuple[str, str]]) -> torch.Tensor:
    """Per member: mean over pairs of ``|log(||A||_F / ||B||_F)|`` (as :func:`reflora.diagnose`)."""
    vals = [0.5 * (params[a].square().flatten(1).sum(1).log() - params[b].square().flatten(1).sum(1).log()).abs()
            for a, b in keys]
    return torch.stack(vals).mean(0)


def vmapped_sweep(task: Task, method: str, lrs: list[float], seed: int, steps: int) -> tuple[list[Run], float, str]:
    """Train ``method`` at every rate of ``lrs`` from seed ``seed``'s model in one vmapped program.

    Args:
        task: a task with ``vmappable`` set.
        method: one of :data:`VMAP_METHODS`.
        lrs: the members' learning rates.
        seed: the seed (model, head init, batches), as in :func:`~reflora.bench.runner.run_one`.
        steps: optimizer steps.

    Returns:
        ``(runs, seconds, note)``: one :class:`~reflora.bench.runner.Run` per rate (``path``
        ``"vmap"``; ``ms_per_step`` and ``state_mb`` are NaN, a member has no step time of its own),
        the program's wall time (build, train, evaluation), and ``""`` or a note that the
        program failed and its members ran one by one.
    """
    if method not in VMAP_METHODS:
        raise ValueError(f"method {method!r} has no reflora.func form; vmappable: {list(VMAP_METHODS)}")
    t_start = time.perf_counter()
    try:
        runs = _program(task, method, lrs, seed, steps)
        note = ""
    except Exception as exc:  # noqa: BLE001 - reported in the table and re-run one by one
        note = f"{task.name}/{method}/seed {seed}: vmapped program failed ({type(exc).__name__}: {exc}); ran one by one"
        runs = [run_one(task, method, lr, seed, steps) for lr in lrs]
    return runs, time.perf_counter() - t_start, note


def _program(task: Task, method: str, lrs: list[float], seed: int, steps: int) -> list[Run]:
    torch.manual_seed(seed)
    model = task.build(seed)
    model.train()
    wrap = _LossModule(model, task.loss)
    pairs = reflora.func.pairs_of(wrap)  # discovery once: the optimizer's pairs and the imbalance keys
    opt = _optimizer(method, pairs, lrs[0])
    keys = [(p.A, p.B) for p in pairs]
    n = len(lrs)
    params = {k: v.detach().unsqueeze(0).expand(n, *v.shape).clone() for k, v in wrap.named_parameters()
              if v.requires_grad}
    fixed = {k: v.detach() for k, v in wrap.named_parameters() if not v.requires_grad}
    fixed.update({k: v for k, v in wrap.named_buffers()})

    def loss_fn(p, batch):
        return functional_call(wrap, {**p, **fixed}, (batch,))

    state = vmap(opt.init)(params, torch.tensor(lrs, dtype=torch.float64))
    step_fn = vmap(grad_and_value(loss_fn), in_dims=(0, None))
    update = vmap(opt.update)
    batches = task.batches(seed)
    every = max(1, steps // 40)
    losses, imbalance = [], []
    with torch.no_grad():  # vmap(grad) differentiates inside; nothing outside needs a graph
        for step in range(steps):
            grads, loss = step_fn(params, next(batches))
            params, state = update(grads, state, params)
            losses.append(loss)
            if (step + 1) % every == 0 or step == 0:
                imbalance.append((step + 1, _imbalance(params, keys)))
    table = torch.stack(losses).T.tolist()  # (members, steps): one host sync, at the end
    imb = [(s, v.tolist()) for s, v in imbalance]
    runs = []
    for i, lr in enumerate(lrs):
        run = Run(task.name, method, lr, seed, path="vmap")
        for step, value in enumerate(table[i]):
            run.losses.append(value)
            if not math.isfinite(value):
                run.error = "diverged (non-finite loss)"
                break
        run.imbalance = [(s, v[i]) for s, v in imb if s <= len(run.losses)]
        if not run.error:
            with torch.no_grad():
                for k, v in params.items():
                    wrap.get_parameter(k).copy_(v[i])
            run.metric = task.evaluate(model, seed, "test")
            run.val_metric = task.evaluate(model, seed, "val")
        runs.append(run)
    return runs
