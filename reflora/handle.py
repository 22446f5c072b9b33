r"""The handle :func:`reflora.attach` returns: the optimizer's step hooks and the step counter.

Each optimizer step, the step *pre*-hook hands the step to the handle's strategy
(:mod:`reflora.strategies`: by default the whole step, in the hook, through its
:class:`~reflora.runner.StepRunner`), and the *post*-hook counts it. What the handle holds besides
is in modules of their own: the gradient-space metric cache (:class:`reflora.cache.MetricCache`),
the diagnostics (:class:`reflora.diagnostics.Recorder`) and the checkpoint format
(:mod:`reflora.checkpoint`). The semantics (warmup, interval, ``GradScaler``, ``step(closure)``,
compiled steps) are in the docstring of :func:`reflora.attach` and in ``docs/semantics.md``.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from reflora import checkpoint
from reflora.cache import MetricCache
from reflora.config import RefLoRAConfig
from reflora.diagnostics import Recorder
from reflora.pairs import LoRAPair
from reflora.runner import StepCounter, StepRunner
from reflora.step import group_pairs
from reflora.strategies import HookStrategy, Strategy
from reflora.transport import get_state_transport

__all__ = ["RefLoRAHandle", "check_not_attached"]

# optimizer -> {param id: handle}: guards against attaching twice to the same parameters.
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RefLoRAHandle]]" = weakref.WeakKeyDictionary()


def check_not_attached(optimizer: torch.optim.Optimizer, pairs: Iterable[LoRAPair], hint: str = " on this optimizer") -> None:
    """Raise if a live handle on ``optimizer`` already manages a factor of ``pairs``."""
    registered = _ATTACHED.get(optimizer, {})
    for pair in pairs:
        for t in (pair.A, pair.B):
            other = registered.get(id(t))
            if other is not None and not other.removed:
                raise ValueError(
                    f"pair {pair.name!r} is already managed by {other!r}{hint}; call handle.remove() first"
                )


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


def _option(field: str) -> property:
    """A handle attribute that reads (and, validated, replaces) one field of its configuration."""

    def set_(self: RefLoRAHandle, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{field: value})

    return property(lambda self: getattr(self.config, field), set_, doc=f"``config.{field}``.")


class RefLoRAHandle:
    """What :func:`attach` returns: removes the hooks, checkpoints the step counter and caches.

    Attributes:
        pairs: the managed :class:`~reflora.LoRAPair` objects, in order.
        optimizer: the optimizer whose hooks are used (unwrapped from accelerate if needed).
        config: the validated :class:`~reflora.config.RefLoRAConfig` (``space`` resolved);
            ``variant``, ``space``, ``warmup_steps``, ``interval``, ``eps``, ``second_moment``,
            ``frame``, ``solver``, ``resolved``, ``diagnostics_interval`` and ``compiled`` read it.
        strategy: where the step runs (:mod:`reflora.strategies`).
        runner: the step's work (:class:`reflora.runner.StepRunner`), which strategies drive.
        cache: the gradient-space metric cache (:class:`reflora.cache.MetricCache`).
        step_count: completed optimizer steps seen since attaching (or restored).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], config: RefLoRAConfig,
        strategy: Strategy | None = None,
    ) -> None:
        assert config.space in ("gradient", "parameter"), "resolve space='auto' before building a handle"
        self.optimizer = optimizer
        self.pairs: tuple[LoRAPair, ...] = tuple(pairs)
        self.strategy: Strategy = HookStrategy() if strategy is None else strategy
        self._groups = group_pairs(self.pairs)
        self._counter = StepCounter(self.pairs[0].A.device)
        self.cache = MetricCache(self.pairs, self._groups, config.caches, config.variant == "scalar")
        self._recorder = Recorder(self.pairs, self._groups)
        transport = get_state_transport(optimizer) if config.space == "parameter" else None
        self.runner = StepRunner(optimizer, self.pairs, self._groups, config, transport, self._counter,
                                 self.cache, self._recorder)
        self._config = config
        self._hooks: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._hooks += self.strategy.install(self)
        self._removed = False
        self._closure_calls: list[int] | None = None  # this step's closure calls, for step(closure)
        self._in_step = False  # between the pre- and post-hook of one optimizer step
        self._nested = 0  # hooks of an inner step() (a subclass calling super().step()) to ignore
        self._warned_closure = False
        registered = _ATTACHED.setdefault(optimizer, {})
        for pair in self.pairs:
            registered[id(pair.A)] = self
            registered[id(pair.B)] = self

    # -- configuration -----------------------------------------------------------------------
    @property
    def config(self) -> RefLoRAConfig:
        """The validated configuration; assigning one (or an option below) validates it again."""
        return self._config

    @config.setter
    def config(self, value: RefLoRAConfig) -> None:
        self._config = self.runner.config = value

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
        return self._counter.value

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._counter.value = value

    @property
    def cached_metrics(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{pair index: (S, S^{-1})}`` of the cached metrics (gradient space, ``interval > 1``;
        views of the buffers)."""
        return self.cache.as_dict()

    @property
    def groups(self) -> list[list[int]]:
        """Indices into :attr:`pairs`, one list per same-shape group (one batched core call each)."""
        return [list(g) for g in self._groups]

    @property
    def num_groups(self) -> int:
        """How many batched core calls one step makes (one per same-shape group)."""
        return len(self._groups)

    def gradient_metrics(self, groups: list[tuple[int, list[int]]], refresh: bool) -> list[tuple[Tensor, Tensor]]:
        """``(S, S^{-1})`` for each ``(group index, members)`` of eager gradient space: fresh
        where ``refresh`` or a member has none cached, else the cached ones; fresh ones are
        cached (``interval > 1``)."""
        return self.runner.gradient_metrics(groups, refresh)

    def check_state(self, pairs: Any) -> None:
        """Raise (before anything is modified) if the transport cannot move these pairs' state."""
        self.runner.check_state(pairs)

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
            self.strategy.pre_step(self, optimizer, kwargs)
            return None
        calls = self._closure_calls = [0]

        def closure_then_reflora() -> Any:
            loss = closure()
            calls[0] += 1
            if calls[0] == 1:
                self.strategy.pre_step(self, optimizer, kwargs)
            return loss

        if positional:
            return (args[0], closure_then_reflora, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_reflora}

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
        self.runner.after_step(optimizer, kwargs)
        self.strategy.post_step(self)

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
        return self._recorder.read(self.diagnostics_interval)

    def remove(self) -> None:
        """Detach from the optimizer; afterwards it steps exactly as without RefLoRA."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        registered = _ATTACHED.get(self.optimizer)
        if registered is not None:
            for p in self.pairs:
                for t in (p.A, p.B):
                    if registered.get(id(t)) is self:
                        del registered[id(t)]
        self._removed = True

    def follow(self, target: Any) -> list[str]:
        """Move an averaged copy of the model (EMA or SWA weights) with every refactor.

        A parameter-space refactor replaces ``(A, B)`` by ``(P^T A, B P^{-T})``: ``B A`` is kept,
        but an average of past factors kept elsewhere (``torch.optim.swa_utils.AveragedModel``,
        timm's ``ModelEmaV3``, Lightning's ``WeightAveraging``) would from then on mix two
        factorizations, and its product drift from the average of the products. After
        ``follow``, each refactor maps the copies like the factors (they are points in parameter
        space, the ``"iterate"`` kind of :data:`reflora.transport.STATE_KINDS`), on their own
        device, so the averaged model's ``B_avg A_avg`` is kept too. Several copies may follow.
        In gradient space the factors are never refactored and there is nothing to do.

        Args:
            target: the averaged model (an ``nn.Module``: its pairs are found like ``attach``'s)
                or its pairs. Each of this handle's pairs is matched by name, allowing one
                common prefix (``AveragedModel`` names its copy ``module.<name>``), and must
                have the same shapes and layout.

        Returns:
            the names of the pairs that now follow, in this handle's order.
        """
        from reflora.adapters import as_pairs

        others = as_pairs(target)
        by_name = {f.name: f for f in others}
        first = self.pairs[0].name
        prefixes = sorted({f.name[: len(f.name) - len(first)] for f in others if f.name.endswith(first)}, key=len)
        matched = None
        for prefix in (x for x in prefixes if x == "" or x.endswith(".")):
            got = [by_name.get(prefix + p.name) for p in self.pairs]
            if all(g is not None for g in got):
                matched = got
                break
        if matched is None and len(others) == len(self.pairs) and all(
                p.name == f"pair{i}" for i, p in enumerate(self.pairs)):
            matched = list(others)  # the handle's pairs were given unnamed (tuples): by position
        if matched is None:
            missing = [p.name for p in self.pairs if not any(f.name.endswith(p.name) for f in others)]
            raise ValueError(
                f"follow: the target has no pair matching {(missing[0] if missing else first)!r} (of {len(self.pairs)} "
                f"attached pairs; the target's: {sorted(by_name)[:4]}{'...' if len(by_name) > 4 else ''}); pass the "
                "averaged copy of the model this handle was attached to (or its pairs, with the same names)"
            )
        own = {id(t) for p in self.pairs for t in (p.A, p.B)}
        for p, f in zip(self.pairs, matched):
            if id(f.A) in own or id(f.B) in own:
                raise ValueError(f"follow: pair {f.name!r} is one of this handle's own pairs; pass the averaged copy, not the model")
            if (f.A.shape, f.B.shape, f.layout, f.experts) != (p.A.shape, p.B.shape, p.layout, p.experts):
                raise ValueError(
                    f"follow: pair {f.name!r} has shapes {tuple(f.A.shape)}, {tuple(f.B.shape)} (layout {f.layout}) where "
                    f"{p.name!r} has {tuple(p.A.shape)}, {tuple(p.B.shape)} (layout {p.layout}); the averaged copy must "
                    "have the attached model's adapters"
                )
        for p, f in zip(self.pairs, matched):
            self.runner.followers.setdefault(id(p), []).append(f)
        return [p.name for p in self.pairs]

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` was called."""
        return self._removed

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume identically: config, step counter, cached metrics
        (the format: :mod:`reflora.checkpoint`)."""
        return checkpoint.save_state(self.config, self.pairs, self.step_count, self.cache)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; the configuration must match this handle's.

        ``variant``, ``space``, ``interval`` and (while a warmup is running) ``warmup_steps`` shape
        the saved state and always have to match. The options that change only the arithmetic
        of later steps (``resolved``, ``frame``, ``second_moment``, ``solver``, ``eps``) are
        refused too when they differ, since a resumed run would then silently train differently
        from the one saved; with ``strict=False`` such a state loads with one warning naming them,
        and the run goes on with this handle's settings.
        """

        def set_count(value: int) -> None:
            self.step_count = value

        checkpoint.load_state(state, self.config, self.pairs, self.cache, set_count, strict)

    def __repr__(self) -> str:
        return (
            f"RefLoRAHandle(variant={self.variant!r}, space={self.space!r}, pairs={len(self.pairs)}, "
            f"groups={self.num_groups}, warmup_steps={self.warmup_steps}, interval={self.interval}, "
            f"solver={self.solver!r}, step_count={self.step_count})"
        )
