r"""One optimizer step of a handle, eager or traced: gather the pairs, call the step core.

:class:`StepRunner` is what a strategy drives (:mod:`reflora.strategies`). Eager steps decide in
Python (warmup, interval, a ``GradScaler`` skip, which pairs have gradients) and skip the work a
step does not need; a traced step (inside ``torch.compile``) must not branch on the step counter
or the scaler's verdict, so the decision is a 0-d bool tensor, every update is computed and
selected with ``torch.where``, and one graph serves every step.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from reflora import step as core
from reflora.cache import MetricCache
from reflora._kernels import decomposable
from reflora.config import DivergenceWarning, RefLoRAConfig
from reflora.diagnostics import Recorder
from reflora.distributed import any_sharded
from reflora.pairs import LoRAPair, UnusedPairWarning
from reflora.reshard import restaged
from reflora.transport import StateTransport

__all__ = ["StepCounter", "StepRunner", "scaler_proceeds", "scaler_skips"]

# eager steps after which a pair that never had a gradient is named in a warning
GRADIENT_CHECK_STEPS = 3
# how often an accelerator's eager step checks for divergence (a host sync); CPU steps: every step
DIVERGENCE_CHECK_EVERY = 50


def _found_inf(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> Any:
    """What ``GradScaler`` told this step's optimizer about inf/NaN gradients (``None``: nothing).

    torch's ``GradScaler.step`` steps an optimizer that handles AMP scaling itself
    (``_step_supports_amp_scaling``: the fused Adam / AdamW / SGD / Adagrad) with
    ``optimizer.found_inf`` and ``optimizer.grad_scale`` set as attributes, and the fused kernel
    skips the update when ``found_inf`` is nonzero; every other optimizer is simply not stepped.
    Older callers passed ``found_inf=`` to ``step()``; both are read.
    """
    found_inf = kwargs.get("found_inf") if kwargs else None
    if found_inf is None:
        found_inf = getattr(optimizer, "found_inf", None)
    return found_inf


def scaler_skips(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> bool:
    """Eager steps: whether ``GradScaler`` skips this step (reading the tensor syncs with the
    device, once per step, only while a scaler has set it)."""
    found_inf = _found_inf(optimizer, kwargs)
    if isinstance(found_inf, Tensor):
        return bool(found_inf.ne(0).any())
    return bool(found_inf)


def scaler_proceeds(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> Tensor | bool:
    """Traced steps: ``not skipped`` as a 0-d bool tensor (no host sync), or a Python bool when no
    scaler set a tensor (its presence is a stable guard, not a per-step value)."""
    found_inf = _found_inf(optimizer, kwargs)
    if isinstance(found_inf, Tensor):
        return found_inf.eq(0).all()
    return not found_inf


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning raised here at the first frame outside reflora and
    torch (the user's ``opt.step()`` call, however deep the hooks are nested)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


class StepCounter:
    """Completed optimizer steps, in a 0-d int64 tensor on the pairs' device, advanced in place.

    A compiled optimizer step reads the tensor as a graph input, where a Python int would be a
    guard that changes every step (a recompile per step). Eager steps keep a Python mirror so
    that they never sync with the device to branch on it; a traced step cannot update the
    mirror and drops it, and the next eager read resyncs once.
    """

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros((), dtype=torch.int64, device=device)
        self._count: int | None = 0
        self.skip = False  # the current eager step is not counted (a GradScaler skip)

    @property
    def value(self) -> int:
        if self._count is None:  # compiled steps advanced the tensor: one sync to catch up
            self._count = int(self.tensor)
        return self._count

    @value.setter
    def value(self, value: int) -> None:
        self._count = int(value)
        self.tensor.fill_(self._count)

    def advance(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> None:
        """Count the step that just finished (a traced one by the scaler's verdict, as a tensor)."""
        if torch.compiler.is_compiling():
            proceeds = scaler_proceeds(optimizer, kwargs)
            if isinstance(proceeds, Tensor):
                self.tensor.add_(proceeds.to(self.tensor.device, torch.int64))
            elif proceeds:
                self.tensor.add_(1)
            self._count = None  # the Python mirror cannot follow a traced step
        elif not self.skip:
            self._count = self.value + 1
            self.tensor.add_(1)


class StepRunner:
    """RefLoRA's work in one optimizer step for a handle's pairs.

    Args:
        optimizer: the optimizer whose state parameter space moves.
        pairs: the managed pairs.
        groups: their same-shape groups (indices into ``pairs``).
        config: the handle's configuration (``space`` resolved; replaced when the handle's is).
        transport: the optimizer's state transport (parameter space), else ``None``.
        counter, cache, recorder: the handle's step counter, metric cache and diagnostics.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, pairs: tuple[LoRAPair, ...], groups: list[list[int]],
        config: RefLoRAConfig, transport: StateTransport | None, counter: StepCounter, cache: MetricCache,
        recorder: Recorder,
    ) -> None:
        self.optimizer = optimizer
        self.pairs = pairs
        self.groups = groups
        # id(pair) -> the pairs that follow it (averaged copies: RefLoRAHandle.follow)
        self.followers: dict[int, list[LoRAPair]] = {}
        self.config = config
        self.transport = transport
        self.counter = counter
        self.cache = cache
        self.recorder = recorder
        # pairs that have had no gradient yet, checked in the first eager steps (then None)
        self._never_grad: set[int] | None = set(range(len(pairs)))
        self._diverged_named = False  # one DivergenceWarning per handle

    def run(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> None:
        """This step's work on the gradients now present: eager, or traced inside ``torch.compile``."""
        if torch.compiler.is_compiling():
            self.traced(optimizer, kwargs)
        else:
            self.eager(optimizer, kwargs)

    # -- eager ---------------------------------------------------------------------------------
    def eager(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> None:
        self.counter.skip = False
        if self._never_grad is not None:
            self._check_gradients()
        if scaler_skips(optimizer, kwargs):
            # the optimizer will skip this step itself: touch nothing, count nothing
            self.counter.skip = True
            return
        # With a fused optimizer under GradScaler the gradients seen here are still *scaled* by
        # grad_scale (the fused kernel unscales them). That is harmless: the metric and the
        # refactor depend on the factors only, and every gradient map (S^-1 g, g S, P^-1 g,
        # g P) is linear, so it commutes with the kernel's division by grad_scale.
        cfg, t = self.config, self.counter.value
        due = self.recorder.begin(t, cfg)
        started = t >= cfg.warmup_steps
        refactors = started and cfg.space == "parameter" and cfg.active(t)
        works = (started and cfg.space == "gradient") or refactors or (due and cfg.variant == "full")
        try:
            # factors sharded along their rank dimension (FSDP2's default Shard(0) of lora_A) step
            # on work copies sharded along m / n (reflora.reshard); a no-op for every other pair
            with torch.no_grad(), restaged(self.pairs if works else (), self.optimizer, refactors):
                if started:
                    if cfg.space == "gradient":
                        self.gradient_step(refresh=cfg.active(t) or cfg.interval == 1)
                    elif refactors:
                        self.parameter_step()
                if due:
                    self.recorder.finish(t, cfg.variant, cfg.eps)
        finally:
            self.recorder.parts = None

    def _check_gradients(self) -> None:
        """One :class:`~reflora.pairs.UnusedPairWarning` naming the pairs with a factor that still has
        no gradient at the third eager step (never used by the forward pass, or detached)."""
        assert self._never_grad is not None
        self._never_grad = {i for i in self._never_grad if self.pairs[i].A.grad is None or self.pairs[i].B.grad is None}
        if self.counter.value + 1 < GRADIENT_CHECK_STEPS or not self._never_grad:
            if not self._never_grad:
                self._never_grad = None
            return
        names = [self.pairs[i].name for i in sorted(self._never_grad)]
        self._never_grad = None
        shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(
            f"RefLoRA pair(s) {shown}: a factor has had no gradient in the first {GRADIENT_CHECK_STEPS} optimizer "
            "steps, so RefLoRA cannot act on it. Check that the forward pass uses the adapter (a LoRA wrapper its "
            "parent module bypasses never runs), or leave the pair out of attach",
            UnusedPairWarning,
            stacklevel=5,
        )

    # -- traced --------------------------------------------------------------------------------
    def traced(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> None:
        """Inside ``torch.compile`` (a compiled ``opt.step`` or train step): nothing branches in
        Python on the step counter or the scaler's verdict; the r x r kernel runs every step, also
        where eager would skip it (the price of not recompiling)."""
        if any_sharded(self.pairs):
            raise NotImplementedError(
                "RefLoRA's hooks on sharded (DTensor / FSDP2) factors do not run inside a compiled "
                "optimizer step: the all-reduce of the Grams would have to be traced. Step the optimizer "
                "eagerly (compile the model's forward instead), or pass compile=True to attach to compile "
                "the r x r kernel only"
            )
        proceeds = scaler_proceeds(optimizer, kwargs)
        if proceeds is False:
            return  # a scaler's Python verdict: a stable guard, not a per-step value
        cfg, t = self.config, self.counter.tensor
        started = t >= cfg.warmup_steps
        if isinstance(proceeds, Tensor):
            started = started & proceeds.to(t.device)
        active = started if cfg.interval == 1 else started & ((t - cfg.warmup_steps) % cfg.interval == 0)
        with torch.no_grad():
            if cfg.space == "gradient":
                self.gradient_step(refresh=True, gate=started, refresh_gate=active)
            else:
                self.parameter_step(gate=active)

    def after_step(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> None:
        """The step finished: count it. After a traced step the Python mirrors (the count, the
        cache's flags) resync at the next eager read, and no diagnostics were recorded."""
        self.counter.advance(optimizer, kwargs)
        if torch.compiler.is_compiling():
            self.cache.forget_mirror()
            self.recorder.traced_steps = True

    # -- the two spaces ------------------------------------------------------------------------
    def members(self, group: list[int]) -> list[int]:
        """The pairs of ``group`` that have both gradients this step."""
        return [i for i in group if self.pairs[i].A.grad is not None and self.pairs[i].B.grad is not None]

    def compute_metrics(self, jobs: list[list[LoRAPair]], transform: bool) -> list[tuple[Tensor, ...]]:
        """:func:`reflora.step.group_metrics` of ``jobs``, with this step's Grams shown to the recorder."""
        cfg = self.config

        def on_grams(pairs: list[LoRAPair], X: Tensor, Y: Tensor) -> None:
            self.recorder.on_grams(pairs, X, Y, cfg.eps)
            self._check_divergence(pairs, X, Y)

        return core.group_metrics(jobs, cfg, transform, on_grams)

    def _check_divergence(self, pairs: list[LoRAPair], X: Tensor, Y: Tensor) -> None:
        """One :class:`~reflora.config.DivergenceWarning` naming the pairs whose Grams are non-finite
        or too large to decompose (the kernel leaves those: NaN, or the identity). Eager steps
        only; a host sync, so on an accelerator only every :data:`DIVERGENCE_CHECK_EVERY` steps."""
        if self._diverged_named or torch.compiler.is_compiling():
            return
        if X.device.type != "cpu" and self.counter.value % DIVERGENCE_CHECK_EVERY:
            return
        bad = ~decomposable(X, Y)
        bad = bad.flatten(1).any(-1) if bad.dim() > 1 else bad  # experts: any expert of the pair
        if not bool(bad.any()):
            return
        self._diverged_named = True
        names = [p.name for p, b in zip(pairs, bad.tolist()) if b]
        shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(
            f"the run has diverged at step {self.counter.value}: lower the learning rate (or clip the gradients). "
            f"RefLoRA pair(s) {shown} have non-finite factors or factors too large to decompose; RefLoRA leaves "
            "them to the bare optimizer",
            DivergenceWarning,
            stacklevel=_caller_level(),
        )

    def gradient_metrics(self, work: list[tuple[int, list[int]]], refresh: bool) -> list[tuple[Tensor, Tensor]]:
        """``(S, S^{-1})`` for each ``(group index, members)`` of an eager gradient-space step,
        through the cache (fresh where ``refresh``)."""
        return self.cache.metrics(work, refresh, lambda jobs: self.compute_metrics(jobs, transform=False))  # type: ignore[arg-type,return-value]

    def gradient_step(self, refresh: bool, gate: Tensor | None = None, refresh_gate: Tensor | None = None) -> None:
        """Precondition the gradients. Eager: ``refresh`` says whether ``S`` is recomputed (else
        the cached one is applied). Traced: ``gate`` (started, not skipped) and ``refresh_gate``
        (a refresh step) are 0-d bool tensors and ``S`` is computed every step."""
        work = [(g, m) for g, m in ((g, self.members(group)) for g, group in enumerate(self.groups)) if m]
        jobs = [[self.pairs[i] for i in members] for _, members in work]
        if gate is None:
            metrics = self.gradient_metrics(work, refresh)
        else:
            metrics = []
            for (g, members), (S, S_inv) in zip(work, self.compute_metrics(jobs, transform=False)):
                gate = gate.to(S.device)
                if self.cache.enabled:
                    assert refresh_gate is not None
                    S, S_inv = self.cache.traced(g, members, S, S_inv, gate, refresh_gate.to(gate.device))
                metrics.append((S, S_inv))
        core.precondition_groups(jobs, metrics, gate)

    def parameter_step(self, gate: Tensor | None = None) -> None:
        """Refactor every group; traced steps pass ``gate`` (a 0-d bool: act this step).

        Every pair's grads are read before ``opt.state`` is: under ``torch.compile`` a parameter
        first reached as a key of ``opt.state`` has its ``.grad`` guarded by identity, and
        ``zero_grad(set_to_none=True)`` frees that tensor every step, which would invalidate the
        compiled graph.
        """
        assert self.transport is not None
        jobs = [[self.pairs[i] for i in self.members(group)] for group in self.groups]
        jobs = [pairs for pairs in jobs if pairs]
        core.refactor_groups(
            jobs, self.compute_metrics(jobs, transform=True), self.optimizer, self.transport,
            self.config.second_moment, gate, self.followers,
        )

    def check_state(self, pairs: Any) -> None:
        """Raise (before anything is modified) if the transport cannot move these pairs' state."""
        if self.transport is not None:
            self.transport.check_pairs(self.optimizer, pairs, self.config.second_moment)
