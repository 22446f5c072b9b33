r"""The handle :func:`reflora.attach` returns: step hooks, the step counter, the cache, checkpoints.

Each optimizer step, the step *pre*-hook gathers the pairs that have gradients, group by group,
and calls the step core (:mod:`reflora.step`): ``S`` (gradient space; cached between refreshes
with ``interval > 1``) or the refactor transform (parameter space), then the products on the
gradients, or on the factors, gradients and optimizer state. The *post*-hook counts the step.
Where the gradients are handled is a strategy: the default one works in the pre-hook; the
DeepSpeed ZeRO one (:class:`reflora.integrations.deepspeed.ZeroGradientStrategy`) in gradient
hooks during backward. The semantics (warmup, interval, ``GradScaler``, compiled steps) are in
the docstring of :func:`reflora.attach` and in ``docs/design.md``.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from reflora import step as core
from reflora.diagnostics import group_stats, pair_stats, rows_in_order
from reflora.distributed import any_sharded
from reflora.pairs import LoRAPair, UnusedPairWarning, canonical_name
from reflora.reshard import restaged
from reflora.transport import get_state_transport

if TYPE_CHECKING:
    from reflora.config import RefLoRAConfig

__all__ = ["HookStrategy", "RefLoRAHandle"]

# optimizer -> {param id: handle}; guards against attaching twice to the same parameters.
ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RefLoRAHandle]]" = weakref.WeakKeyDictionary()


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


def _scaler_skips(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> bool:
    """Eager steps: whether ``GradScaler`` skips this step (reading the tensor syncs with the
    device, once per step, only while a scaler has set it)."""
    found_inf = _found_inf(optimizer, kwargs)
    if isinstance(found_inf, Tensor):
        return bool(found_inf.ne(0).any())
    return bool(found_inf)


def _scaler_proceeds(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None) -> Tensor | bool:
    """Traced steps: ``not skipped`` as a 0-d bool tensor (no host sync), or a Python bool when no
    scaler set a tensor (its presence is a stable guard, not a per-step value)."""
    found_inf = _found_inf(optimizer, kwargs)
    if isinstance(found_inf, Tensor):
        return found_inf.eq(0).all()
    return not found_inf


def _steps_running(optimizer: torch.optim.Optimizer) -> int:
    """How many ``step()`` calls of ``optimizer`` are on the stack (torch's hook wrappers), read
    only when a pre-hook finds the previous step unfinished: 2 for ``super().step()`` inside a
    subclass's step, 1 when the previous step raised before its post-hook ran."""
    wrapper = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__
    frame, n = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is wrapper and frame.f_locals.get("self") is optimizer:
            n += 1
        frame = frame.f_back
    return n


def _pair_mismatch(saved: list[str], names: list[str]) -> str:
    """The error for a checkpoint whose pairs are not this handle's: where they first differ."""
    first = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b), min(len(saved), len(names)))
    at = lambda xs: repr(xs[first]) if first < len(xs) else "(none)"  # noqa: E731
    return (
        f"checkpoint manages {len(saved)} pairs but this handle manages {len(names)}; they first differ at "
        f"position {first}: checkpoint {at(saved)} vs handle {at(names)} (names compared after dropping "
        "the wrapper segments of DDP / DataParallel 'module.', torch.compile '_orig_mod.', FSDP and "
        "activation checkpointing). Attach to the same pairs in the same order: find them on the "
        "same module (e.g. the PEFT model, not its base model), with the same adapters; pairs "
        "passed as (A, B) tuples are named pair0, pair1, ..."
    )


# eager steps after which a pair that never had a gradient is named in a warning
_GRADIENT_CHECK_STEPS = 3
# options a checkpoint records that change only the arithmetic of later steps (see load_state_dict)
_MATH_OPTIONS = ("resolved", "frame", "second_moment", "solver", "eps")


def _option(field: str) -> property:
    """A handle attribute that reads (and, validated, replaces) one field of its configuration."""

    def set_(self: RefLoRAHandle, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{field: value})

    return property(lambda self: getattr(self.config, field), set_, doc=f"``config.{field}``.")


class HookStrategy:
    """The default strategy: the whole step runs in the optimizer's step pre-hook."""

    def install(self, handle: RefLoRAHandle) -> list[RemovableHandle]:
        return []

    def pre_step(self, handle: RefLoRAHandle, optimizer: torch.optim.Optimizer, kwargs: Any) -> None:
        handle._step_in_pre_hook(optimizer, kwargs)

    def post_step(self, handle: RefLoRAHandle) -> None:
        pass


class RefLoRAHandle:
    """What :func:`attach` returns: removes the hooks, checkpoints the step counter and caches.

    Attributes:
        pairs: the managed :class:`~reflora.LoRAPair` objects, in order.
        optimizer: the optimizer whose hooks are used (unwrapped from accelerate if needed).
        config: the validated :class:`~reflora.config.RefLoRAConfig` (``space`` resolved);
            ``variant``, ``space``, ``warmup_steps``, ``interval``, ``eps``, ``second_moment``,
            ``frame``, ``solver``, ``resolved``, ``diagnostics_interval`` and ``compiled`` read it.
        step_count: completed optimizer steps seen since attaching (or restored).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], config: RefLoRAConfig,
        strategy: Any = None,
    ) -> None:
        assert config.space in ("gradient", "parameter"), "resolve space='auto' before building a handle"
        self.optimizer = optimizer
        self.pairs: tuple[LoRAPair, ...] = tuple(pairs)
        self.config = config
        self._strategy = HookStrategy() if strategy is None else strategy
        # latest diagnostics: (step, [(pairs, stats of those pairs)]) kept as tensors until read
        self._diag: tuple[int, list[tuple[list[LoRAPair], dict[str, Tensor]]]] | None = None
        self._diag_parts: list[tuple[list[LoRAPair], dict[str, Tensor]]] | None = None
        # The step counter lives in a 0-d int64 tensor on the pairs' device, advanced in place: a
        # compiled optimizer step reads it as a graph input, where a Python int would be a guard
        # that changes every step (a recompile per step). Eager steps keep a Python mirror
        # (``_count``) so that they never sync with the device to branch on it; a traced step
        # cannot update the mirror and sets it to None, and the next eager read resyncs once.
        self._step = torch.zeros((), dtype=torch.int64, device=self.pairs[0].A.device)
        self._count: int | None = 0
        self._skip_count = False
        self._traced_steps = False  # a step ran inside torch.compile (it records no diagnostics)
        transport = get_state_transport(optimizer) if config.space == "parameter" else None
        self._mover = core.StateMover(optimizer, transport)
        self._groups = core.group_pairs(self.pairs)
        self._bufs = self._make_cache_buffers()
        self._cached: set[int] | None = set()  # Python mirror of the buffers' `valid` flags
        self._hooks: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._hooks += self._strategy.install(self)
        self._removed = False
        self._closure_calls: list[int] | None = None  # this step's closure calls, for step(closure)
        self._in_step = False  # between the pre- and post-hook of one optimizer step
        self._nested = 0  # hooks of an inner step() (a subclass calling super().step()) to ignore
        self._warned_closure = False
        # pairs that have had no gradient yet, checked in the first eager steps (then None)
        self._never_grad: set[int] | None = set(range(len(self.pairs)))

    # -- configuration -----------------------------------------------------------------------
    variant = _option("variant")
    space = _option("space")
    warmup_steps = _option("warmup_steps")
    interval = _option("interval")
    eps = _option("eps")
    second_moment = _option("second_moment")
    frame = _option("frame")
    solver = _option("solver")
    resolved = _option("resolved")
    diagnostics_interval = _option("diagnostics_interval")
    compiled = _option("compile")

    # -- counter and cache -------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Completed optimizer steps seen since attaching (or restored); skipped steps excluded."""
        if self._count is None:  # compiled steps advanced the tensor: one sync to catch up
            self._count = int(self._step)
        return self._count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._count = int(value)
        self._step.fill_(self._count)

    def _make_cache_buffers(self) -> list[tuple[Tensor, Tensor, Tensor]] | None:
        """Per group ``(S, S^{-1}, valid)`` of the gradient-space cache (``interval > 1`` only).

        Preallocated, so that a compiled step writes into fixed tensors instead of growing a dict
        (a new guard); ``valid[j]`` says whether member ``j`` has a metric yet.
        """
        if not self.config.caches:
            return None
        bufs = []
        for group in self._groups:
            p = self.pairs[group[0]]
            r = 1 if self.variant == "scalar" else p.rank
            shape = (len(group), *((p.experts,) if p.experts > 1 else ()), r, r)
            # the dtype the metrics are applied in (reflora.step.apply_dtype): float32, float64 for
            # float64 factors; a cached S is what a fresh one is rounded to when applied, so
            # this changes no step and halves the cache against float64 storage
            kw = dict(dtype=torch.float64 if p.A.dtype == torch.float64 else torch.float32, device=p.A.device)
            bufs.append((torch.zeros(shape, **kw), torch.zeros(shape, **kw),
                         torch.zeros(len(group), dtype=torch.bool, device=p.A.device)))
        return bufs

    def _cached_pairs(self) -> set[int]:
        if self._bufs is None:
            return set()
        if self._cached is None:  # compiled steps wrote the buffers: read the flags back once
            self._cached = {
                group[j] for group, (_, _, valid) in zip(self._groups, self._bufs) for j in valid.nonzero().flatten().tolist()
            }
        return self._cached

    @property
    def cached_metrics(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{pair index: (S, S^{-1})}`` of the cached metrics (gradient space, ``interval > 1``;
        views of the buffers)."""
        if self._bufs is None:
            return {}
        cached = self._cached_pairs()
        return {
            i: (S[j], S_inv[j])
            for group, (S, S_inv, _) in zip(self._groups, self._bufs)
            for j, i in enumerate(group)
            if i in cached
        }

    _cache = cached_metrics  # (the name the tests read)

    @property
    def groups(self) -> list[list[int]]:
        """Indices into :attr:`pairs`, one list per same-shape group (one batched core call each)."""
        return [list(g) for g in self._groups]

    @property
    def num_groups(self) -> int:
        """How many batched core calls one step makes (one per same-shape group)."""
        return len(self._groups)

    # -- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        """Run the step now, or, for ``step(closure)``, right after the closure computed the gradients.

        An optimizer calls its closure at the start of ``step()``, after this pre-hook: acting here
        would precondition the previous step's gradients (which the closure then zeroes) or skip
        pairs that have none yet. So the closure is wrapped (a step pre-hook may return new
        ``(args, kwargs)``) and RefLoRA acts when it first returns, on its gradients, before the
        optimizer reads them; later calls of the closure in the same step pass through.

        A subclass whose ``step`` calls ``super().step()`` runs the hooks of both classes' ``step``
        (torch wraps each); the inner ones are ignored, so one optimizer step acts and counts once.
        """
        if self._in_step:
            if _steps_running(optimizer) > 1:
                self._nested += 1
                return None
            self._nested = 0  # the last step raised before its post-hook: this is a new step
        self._in_step = True
        # torch passes the optimizer itself as args[0]; a positional closure is args[1]
        positional = len(args) > 1 and callable(args[1])
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None:
            self._closure_calls = None
            self._strategy.pre_step(self, optimizer, kwargs)
            return None
        calls = self._closure_calls = [0]

        def closure_then_reflora() -> Any:
            loss = closure()
            calls[0] += 1
            if calls[0] == 1:
                self._strategy.pre_step(self, optimizer, kwargs)
            return loss

        if positional:
            return (args[0], closure_then_reflora, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_reflora}

    def _step_in_pre_hook(self, optimizer, kwargs) -> None:
        if torch.compiler.is_compiling():
            self._traced_pre_hook(optimizer, kwargs)
            return
        self._skip_count = False
        if self._never_grad is not None:
            self._check_gradients()
        if _scaler_skips(optimizer, kwargs):
            # the optimizer will skip this step itself: touch nothing, count nothing
            self._skip_count = True
            return
        # With a fused optimizer under GradScaler the gradients seen here are still *scaled* by
        # grad_scale (the fused kernel unscales them). That is harmless: the metric and the
        # refactor depend on the factors only, and every gradient map (S^-1 g, g S, P^-1 g,
        # g P) is linear, so it commutes with the kernel's division by grad_scale.
        cfg, t = self.config, self.step_count
        due = cfg.diagnostics_interval > 0 and t % cfg.diagnostics_interval == 0
        self._diag_parts = [] if due else None
        if due and cfg.space == "parameter" and cfg.variant == "scalar" and cfg.active(t):
            # this step rescales the factors and computes no Grams: take the stats before it does
            groups = [[self.pairs[i] for i in g] for g in self._groups]
            with torch.no_grad():
                self._diag_parts = list(zip(groups, group_stats(groups, cfg.variant, cfg.eps)))
        started = t >= cfg.warmup_steps
        refactors = started and cfg.space == "parameter" and cfg.active(t)
        works = (started and cfg.space == "gradient") or refactors or (due and cfg.variant == "full")
        try:
            # factors sharded along their rank dimension (FSDP2's default Shard(0) of lora_A) step
            # on work copies sharded along m / n (reflora.reshard); a no-op for every other pair
            with torch.no_grad(), restaged(self.pairs if works else (), self.optimizer, refactors):
                if started:
                    if cfg.space == "gradient":
                        self._gradient_step(refresh=cfg.active(t) or cfg.interval == 1)
                    elif refactors:
                        self._parameter_step()
                if due:
                    self._finish_diagnostics(t)
        finally:
            self._diag_parts = None

    def _check_gradients(self) -> None:
        """One :class:`~reflora.pairs.UnusedPairWarning` naming the pairs with a factor that still has
        no gradient at the third eager step (never used by the forward pass, or detached)."""
        self._never_grad = {i for i in self._never_grad if self.pairs[i].A.grad is None or self.pairs[i].B.grad is None}
        if self.step_count + 1 < _GRADIENT_CHECK_STEPS or not self._never_grad:
            if not self._never_grad:
                self._never_grad = None
            return
        names = [self.pairs[i].name for i in sorted(self._never_grad)]
        self._never_grad = None
        shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(
            f"RefLoRA pair(s) {shown}: a factor has had no gradient in the first {_GRADIENT_CHECK_STEPS} optimizer "
            "steps, so RefLoRA cannot act on it. Check that the forward pass uses the adapter (a LoRA wrapper its "
            "parent module bypasses never runs), or leave the pair out of attach",
            UnusedPairWarning,
            stacklevel=4,
        )

    def _traced_pre_hook(self, optimizer, kwargs) -> None:
        """The pre-hook inside ``torch.compile`` (a compiled ``opt.step`` or train step).

        Nothing here branches in Python on the step counter or the scaler's verdict: the
        warmup / interval / skip decision is a 0-d bool tensor, every update is computed and
        selected with ``torch.where``, so one graph serves every step (the r x r kernel runs
        every step, also where eager would skip it: the price of not recompiling).
        """
        if any_sharded(self.pairs):
            raise NotImplementedError(
                "RefLoRA's hooks on sharded (DTensor / FSDP2) factors do not run inside a compiled "
                "optimizer step: the all-reduce of the Grams would have to be traced. Step the optimizer "
                "eagerly (compile the model's forward instead), or pass compile=True to attach to compile "
                "the r x r kernel only"
            )
        proceeds = _scaler_proceeds(optimizer, kwargs)
        if proceeds is False:
            return  # a scaler's Python verdict: a stable guard, not a per-step value
        cfg, t = self.config, self._step
        started = t >= cfg.warmup_steps
        if isinstance(proceeds, Tensor):
            started = started & proceeds.to(t.device)
        active = started if cfg.interval == 1 else started & ((t - cfg.warmup_steps) % cfg.interval == 0)
        with torch.no_grad():
            if cfg.space == "gradient":
                self._gradient_step(refresh=True, gate=started, refresh_gate=active)
            else:
                self._parameter_step(gate=active)

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if self._nested:  # the inner step of a subclass that called super().step()
            self._nested -= 1
            return
        self._in_step = False
        if self._closure_calls is not None and self._closure_calls[0] == 0 and not self._warned_closure:
            self._warned_closure = True
            warnings.warn(
                f"{type(optimizer).__name__}.step(closure) returned without calling the closure, so RefLoRA, "
                "which acts on the closure's gradients, did nothing this step. Compute the gradients before "
                "step() and call it without a closure",
                stacklevel=2,
            )
        if torch.compiler.is_compiling():
            proceeds = _scaler_proceeds(optimizer, kwargs)
            if isinstance(proceeds, Tensor):
                self._step.add_(proceeds.to(self._step.device, torch.int64))
            elif proceeds:
                self._step.add_(1)
            # the Python mirrors cannot follow a traced step; eager code resyncs from the tensors
            self._count = None
            self._cached = None
            self._traced_steps = True
        elif not self._skip_count:
            self._count = self.step_count + 1
            self._step.add_(1)
        self._strategy.post_step(self)

    # -- the step: gather, call the core -----------------------------------------------------
    def _members(self, group: list[int]) -> list[int]:
        return [i for i in group if self.pairs[i].A.grad is not None and self.pairs[i].B.grad is not None]

    def _on_grams(self, pairs: list[LoRAPair], X: Tensor, Y: Tensor) -> None:
        """A diagnostics step: reuse this step's Grams."""
        if self._diag_parts is not None:
            self._diag_parts.append((pairs, pair_stats(X, Y, "full", self.config.eps)))

    def _metrics(self, jobs: list[list[LoRAPair]], transform: bool) -> list[tuple[Tensor, ...]]:
        return core.metrics(jobs, self.config, transform, self._on_grams)

    def gradient_metrics(
        self, groups: list[tuple[int, list[int]]], refresh: bool
    ) -> list[tuple[Tensor, Tensor]]:
        """``(S, S^{-1})`` for each ``(group index, members)`` of eager gradient space: fresh
        where ``refresh`` or a member has none cached, else the cached ones; fresh ones are
        cached (``interval > 1``). Strategies call this."""
        fresh_groups = [(g, members) for g, members in groups if refresh or any(i not in self._cached_pairs() for i in members)]
        fresh_metrics = iter(self._metrics([[self.pairs[i] for i in m] for _, m in fresh_groups], transform=False))
        is_fresh = {g for g, _ in fresh_groups}
        out = []
        for g, members in groups:
            group = self._groups[g]
            bufs = None if self._bufs is None else self._bufs[g]
            if g in is_fresh:
                S, S_inv = next(fresh_metrics)
                if bufs is not None:
                    if members == group:  # the usual case: no index tensor, no host-to-device copy
                        bufs[0].copy_(S)
                        bufs[1].copy_(S_inv)
                        bufs[2].fill_(True)
                    else:
                        pos = torch.tensor([group.index(i) for i in members], device=S.device)
                        bufs[0].index_copy_(0, pos, S)
                        bufs[1].index_copy_(0, pos, S_inv)
                        bufs[2].index_fill_(0, pos, True)
                    self._cached_pairs().update(members)
            else:
                assert bufs is not None
                if members == group:
                    S, S_inv = bufs[0], bufs[1]
                else:
                    pos = [group.index(i) for i in members]
                    S, S_inv = bufs[0][pos], bufs[1][pos]
            out.append((S, S_inv))
        return out

    def _gradient_step(
        self, refresh: bool, gate: Tensor | None = None, refresh_gate: Tensor | None = None
    ) -> None:
        """Precondition the gradients. Eager: ``refresh`` says whether ``S`` is recomputed (else
        the cached one is applied). Traced: ``gate`` (started, not skipped) and ``refresh_gate``
        (a refresh step) are 0-d bool tensors and ``S`` is computed every step."""
        work = [(g, m) for g, m in ((g, self._members(group)) for g, group in enumerate(self._groups)) if m]
        jobs = [[self.pairs[i] for i in members] for _, members in work]
        if gate is None:
            metrics = self.gradient_metrics(work, refresh)
        else:
            metrics = []
            for (g, members), (S, S_inv) in zip(work, self._metrics(jobs, transform=False)):
                gate = gate.to(S.device)
                if self._bufs is not None:
                    assert refresh_gate is not None
                    S, S_inv = self._traced_cache(
                        self._bufs[g], self._groups[g], members, S, S_inv, gate, refresh_gate.to(gate.device))
                metrics.append((S, S_inv))
        core.precondition(jobs, metrics, gate)

    @staticmethod
    def _traced_cache(
        bufs: tuple[Tensor, Tensor, Tensor], group: list[int], members: list[int],
        S: Tensor, S_inv: Tensor, gate: Tensor, refresh_gate: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The cache step as tensor arithmetic: the fresh ``S`` at a refresh step or for a pair
        without a cached one, else the cached ``S``; what was applied is stored when ``gate``."""
        S_buf, S_inv_buf, valid = bufs
        pos = [group.index(i) for i in members]
        if pos == list(range(len(group))):
            idx = None
            old, old_inv, ok = S_buf, S_inv_buf, valid
        else:
            idx = torch.tensor(pos, device=S.device)
            old, old_inv, ok = S_buf[idx], S_inv_buf[idx], valid[idx]
        fresh = (refresh_gate | ~ok).view(-1, *(1,) * (S.dim() - 1))
        S, S_inv = torch.where(fresh, S, old), torch.where(fresh, S_inv, old_inv)
        new = (torch.where(gate, S, old), torch.where(gate, S_inv, old_inv), ok | gate)
        for buf, value in zip(bufs, new):
            if idx is None:
                buf.copy_(value)
            else:
                buf.index_copy_(0, idx, value)
        return S, S_inv

    def _parameter_step(self, gate: Tensor | None = None) -> None:
        """Refactor every group; traced steps pass ``gate`` (a 0-d bool: act this step).

        Every pair's grads are read before ``opt.state`` is: under ``torch.compile`` a parameter
        first reached as a key of ``opt.state`` has its ``.grad`` guarded by identity, and
        ``zero_grad(set_to_none=True)`` frees that tensor every step, which would invalidate the
        compiled graph.
        """
        jobs = [[self.pairs[i] for i in self._members(group)] for group in self._groups]
        jobs = [pairs for pairs in jobs if pairs]
        core.refactor(jobs, self._metrics(jobs, transform=True), self._mover, self.config.second_moment, gate)  # type: ignore[arg-type]

    def check_state(self, pairs: Any) -> None:
        """Raise (before anything is modified) if the transport cannot move these pairs' state."""
        self._mover.check(pairs, self.config.second_moment)

    def _finish_diagnostics(self, t: int) -> None:
        """Store this step's diagnostics: the stats computed from the kernel's Grams where it ran,
        fresh Grams for the other pairs (the scalar variant, cached or warmup steps, no grads)."""
        parts = self._diag_parts or []
        seen = {id(p) for pairs, _ in parts for p in pairs}
        rest = [[self.pairs[i] for i in g if id(self.pairs[i]) not in seen] for g in self._groups]
        rest = [pairs for pairs in rest if pairs]
        parts += list(zip(rest, group_stats(rest, self.variant, self.eps)))
        self._diag = (t, parts)

    # -- public ------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, Any] | None:
        """The latest diagnostics (``attach(..., diagnostics_interval=k)``), or ``None`` if none yet.

        Returns ``{"step": t, "pairs": {name: {stat: float}}}`` with the stats of
        :mod:`reflora.diagnostics` (imbalance ``log(||A||_F / ||B||_F)``, ``cond_AAt``,
        ``cond_BtB``, ``S_deviation``, ``sigma_max``, ``sigma_min`` of ``B A``) of every pair as
        the optimizer step ``t`` began, before RefLoRA acted. They are recorded every ``k``
        eager optimizer steps as tensors (no host sync) and read here (one sync). Steps run
        inside ``torch.compile`` do not record them. :func:`reflora.diagnostics.summarize`
        reduces them to a few scalars.
        """
        if self._diag is None:
            if self.diagnostics_interval > 0 and self._traced_steps:
                warnings.warn(
                    "RefLoRA diagnostics: none recorded, and steps ran inside torch.compile, which does not "
                    "record them (only eager optimizer steps do). For the stats of the pairs now, call "
                    "reflora.diagnostics.diagnose(handle.pairs) outside the compiled step",
                    stacklevel=2,
                )
            return None
        t, parts = self._diag
        return {"step": t, "pairs": rows_in_order(list(self.pairs), [p for p, _ in parts], [s for _, s in parts])}

    def remove(self) -> None:
        """Detach from the optimizer; afterwards it steps exactly as without RefLoRA."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        registered = ATTACHED.get(self.optimizer)
        if registered is not None:
            for p in self.pairs:
                for t in (p.A, p.B):
                    if registered.get(id(t)) is self:
                        del registered[id(t)]
        self._removed = True

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` was called."""
        return self._removed

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume identically: config, step counter, cached metrics.

        Pairs are named canonically (:func:`reflora.pairs.canonical_name`), so the state loads
        into a handle on the same model with or without DDP / ``torch.compile`` / FSDP wrappers.

        The structure depends on the configuration only, never on the steps taken: a handle that
        caches metrics (gradient space, ``interval > 1``) lists every pair under ``"cache"`` (zeros
        until computed) and names the computed ones under ``"cached"``. So a freshly attached
        handle's ``state_dict()`` is a complete template for ``torch.distributed.checkpoint``,
        which loads only the keys the template has. Every tensor is ``r x r`` and the same on
        every rank (replicated), so it loads into any world size.
        """
        cache: dict[str, tuple[Tensor, Tensor]] = {}
        cached: list[str] = []
        if self._bufs is not None:
            done = self._cached_pairs()
            for group, (S, S_inv, _) in zip(self._groups, self._bufs):
                for j, i in enumerate(group):
                    cache[canonical_name(self.pairs[i].name)] = (S[j].clone(), S_inv[j].clone())
            cached = [canonical_name(self.pairs[i].name) for i in sorted(done)]
        return {
            "step_count": self.step_count,
            "variant": self.variant,
            "space": self.space,
            "warmup_steps": self.warmup_steps,
            "interval": self.interval,
            **{key: getattr(self.config, key) for key in _MATH_OPTIONS},
            "pair_names": [canonical_name(p.name) for p in self.pairs],
            "cache": cache,
            "cached": cached,
        }

    def _same_schedule_from(self, state: dict[str, Any]) -> bool:
        """Whether a checkpoint saved with another ``warmup_steps`` acts at the same steps as this
        handle from its ``step_count`` on: both warmups over, and the same phase of ``interval``.
        (Checkpoints of runs that left ``warmup_steps`` at its default before it became 3 where
        the gate is on then load with the new default.)"""
        w0, w1, t = int(state["warmup_steps"]), self.warmup_steps, int(state["step_count"])
        return state["interval"] == self.interval and t >= max(w0, w1) and (w0 - w1) % self.interval == 0

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; the configuration must match this handle's.

        ``variant``, ``space``, ``interval`` and (while a warmup is running) ``warmup_steps`` shape
        the saved state and always have to match. The options that change only the arithmetic
        of later steps (``resolved``, ``frame``, ``second_moment``, ``solver``, ``eps``) are
        refused too when they differ, since a resumed run would then silently train differently
        from the one saved; with ``strict=False`` such a state loads with one warning naming them,
        and the run goes on with this handle's settings. (Checkpoints written before these options
        were saved are not checked for them.)
        """
        if not isinstance(state, dict) or "step_count" not in state:
            raise TypeError("state must be a dict returned by RefLoRAHandle.state_dict()")
        for key in ("variant", "space", "warmup_steps", "interval"):
            if key == "warmup_steps" and self._same_schedule_from(state):
                continue  # another warmup, but over: both act at the same steps from here on
            if state[key] != getattr(self, key):
                # space="auto" became the default in place of "gradient": name the fix
                hint = (f" (space={state[key]!r} explicitly; the default space='auto' picks by optimizer, "
                        "see reflora.default_space)" if key == "space" else "")
                if key == "warmup_steps":  # the default became 3 where the gate is on (0.3.0: 0)
                    hint = (f" (warmup_steps={state[key]!r} explicitly; the default warmup_steps=None is 3 where "
                            "the resolution gate is on; a checkpoint of another warmup loads only once both "
                            "warmups are over and the phase of interval agrees)")
                raise ValueError(
                    f"checkpoint was saved with {key}={state[key]!r} but this handle has "
                    f"{key}={getattr(self, key)!r}; attach with the same settings to resume{hint}"
                )
        differ = {k: (state[k], getattr(self.config, k)) for k in _MATH_OPTIONS if k in state and state[k] != getattr(self.config, k)}
        if differ and strict:
            saved, now = (", ".join(f"{k}={v[i]!r}" for k, v in differ.items()) for i in (0, 1))
            raise ValueError(
                f"checkpoint was saved with {saved} but this handle has {now}: attach with {saved} to resume the "
                "run as saved, or call load_state_dict(state, strict=False) to go on with this handle's settings"
            )
        if differ:
            warnings.warn(
                "loading a RefLoRA checkpoint saved with other settings; from here on the run uses this handle's: "
                + ", ".join(f"{k}={now!r} (saved {saved!r})" for k, (saved, now) in differ.items()),
                stacklevel=2,
            )
        # both sides normalised: checkpoints written before names were canonical may still carry
        # wrapper prefixes (`module.`, `_orig_mod.`, ...)
        names = [canonical_name(p.name) for p in self.pairs]
        saved = [canonical_name(n) for n in state["pair_names"]]
        # before 0.4, a pair owned by the model's root module was named '' (now after its factors, 'U+V')
        legacy = {"": names[i] for i, n in enumerate(saved) if n == "" and i < len(names) and "." not in names[i]}
        saved = [legacy.get(n, n) for n in saved]
        if saved != names:
            raise ValueError(_pair_mismatch(saved, names))
        self.step_count = int(state["step_count"])  # an int in every checkpoint, old and new
        index = {n: i for i, n in enumerate(names)}
        where = {i: (g, j) for g, group in enumerate(self._groups) for j, i in enumerate(group)}
        if self._bufs is not None:
            for _, _, valid in self._bufs:
                valid.zero_()
        self._cached = set()
        # checkpoints before "cached" existed held computed metrics only
        key = lambda n: legacy.get(canonical_name(n), canonical_name(n))  # noqa: E731
        valid_names = {key(n) for n in state.get("cached", state["cache"])}
        for name, (S, S_inv) in state["cache"].items():
            if key(name) not in valid_names:
                continue
            if self._bufs is None:
                raise ValueError("checkpoint holds cached metrics but this handle caches none (interval=1)")
            i = index[key(name)]
            g, j = where[i]
            S_buf, S_inv_buf, valid = self._bufs[g]
            if S.shape != S_buf.shape[1:]:
                raise ValueError(
                    f"cached metric of pair {name!r} has shape {tuple(S.shape)}; this handle expects "
                    f"{tuple(S_buf.shape[1:])}"
                )
            S_buf[j].copy_(S)
            S_inv_buf[j].copy_(S_inv)
            valid[j] = True
            self._cached.add(i)

    def __repr__(self) -> str:
        return (
            f"RefLoRAHandle(variant={self.variant!r}, space={self.space!r}, pairs={len(self.pairs)}, "
            f"groups={self.num_groups}, warmup_steps={self.warmup_steps}, interval={self.interval}, "
            f"solver={self.solver!r}, step_count={self.step_count})"
        )
