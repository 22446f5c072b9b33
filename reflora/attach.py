r"""Attach RefLoRA to any ``torch.optim`` optimizer through its step hooks.

``attach(optimizer, pairs, ...)`` returns a :class:`RefLoRAHandle`; the user keeps their own
optimizer object, so LR schedulers, ``GradScaler``, gradient clipping, param groups and
accelerate keep working. Each optimizer step, in a step *pre*-hook:

* ``space="gradient"`` (the reference code's form): the factor gradients are preconditioned,
  ``grad_A <- S^{-1} grad_A``, ``grad_B <- grad_B S``; parameters and optimizer state are not
  touched, so this works with every optimizer.
* ``space="parameter"``: the factors are replaced by the refactored pair, their gradients are
  mapped into the new coordinates, and the optimizer state is transported (see
  :mod:`reflora.transport`); then the optimizer steps from the refactored pair.

Pairs are grouped by ``(device, dtype, r, m, n, layout)`` and each group is computed by one
batched call of the functional core (one batched ``eigh`` per group, not one per layer); results
are written back with ``copy_`` under ``no_grad``.

Semantics (documented in the README too):

* ``warmup_steps`` and ``interval`` count *optimizer steps* (so gradient accumulation does not
  inflate them). A step that ``GradScaler`` skips (inf/NaN gradients) never calls
  ``optimizer.step()``; it neither refactors nor counts. Fused optimizers that receive
  ``found_inf`` from ``GradScaler`` are checked too.
* RefLoRA acts at steps ``t >= warmup_steps`` with ``(t - warmup_steps) % interval == 0``
  (``t`` counts completed optimizer steps from 0). In gradient space the preconditioner ``S`` is
  recomputed at those steps and the cached ``S`` (O(r^2) per pair) is applied in between; in
  parameter space the factors are refactored at those steps only.
* Gradient clipping called before ``optimizer.step()`` clips the raw gradients; the
  preconditioned ones are not clipped again.
* Pairs whose ``A.grad`` or ``B.grad`` is ``None`` this step (frozen, unused) are skipped.
* With ``warmup_steps`` longer than the run, nothing is touched: the run is bit-identical to
  the bare optimizer.
"""

from __future__ import annotations

import inspect
import weakref
from collections import defaultdict
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from reflora._linalg import default_eps
from reflora.functional import (
    Transform,
    _check_eps,
    _check_variant,
    _matmul_left,
    _matmul_right,
    map_first_moments,
    refactor_transform,
)
from reflora.pairs import LoRAPair
from reflora.transport import TransportContext, get_state_transport, registered_optimizers

__all__ = ["RefLoRAHandle", "UnsupportedOptimizerError", "attach"]

Space = Literal["gradient", "parameter"]
_SPACES = ("gradient", "parameter")
_SECOND_MOMENT_RULES = ("square", "keep", "reset")

# optimizer -> {param id: handle}; guards against attaching twice to the same parameters.
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RefLoRAHandle]]" = (
    weakref.WeakKeyDictionary()
)


class UnsupportedOptimizerError(TypeError):
    """The optimizer cannot be used with the requested RefLoRA mode."""


# ------------------------------------------------------------------------------- kernels
# Pure functions of stacked tensors: the only code that runs per group each step, and the code
# that ``compile=True`` hands to torch.compile (static shapes per group, no recompiles).


def _gradient_kernel(A: Tensor, B: Tensor, variant: str, eps: float) -> tuple[Tensor, Tensor]:
    """``(S, S^{-1})`` of a stack of pairs, in the compute dtype."""
    left, right = refactor_transform(A, B, variant=variant, eps=eps)
    if left.shape[-1] == 1:
        return left.square(), right.square()
    return left.mT @ left, right @ right.mT


def _apply_metric(S: Tensor, S_inv: Tensor, gA: Tensor, gB: Tensor) -> tuple[Tensor, Tensor]:
    cd = S.dtype
    return _matmul_left(S_inv, gA.to(cd)).to(gA.dtype), _matmul_right(gB.to(cd), S).to(gB.dtype)


def _parameter_kernel(
    A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, variant: str, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    left, right = refactor_transform(A, B, variant=variant, eps=eps)
    cd = left.dtype
    A2 = _matmul_left(left, A.to(cd)).to(A.dtype)
    B2 = _matmul_right(B.to(cd), right).to(B.dtype)
    gA2, gB2 = map_first_moments(Transform(left, right), gA, gB)
    return A2, B2, gA2, gB2, left, right


# ------------------------------------------------------------------------------- input handling


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real one in .optimizer;
    # hooks must go on the object whose step() actually runs.
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or (
        type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer")
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 4:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    step = inspect.signature(type(optimizer).step).parameters.get("closure")
    if step is not None and step.default is inspect.Parameter.empty:
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__}.step requires a closure: it re-evaluates the loss several "
            "times per step, and RefLoRA's per-step preconditioning / refactoring would have to run "
            "inside every evaluation. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
        )
    return optimizer


def _as_pairs(pairs: Any) -> list[LoRAPair]:
    if isinstance(pairs, nn.Module):
        from reflora.adapters import find_pairs

        return find_pairs(pairs)
    if isinstance(pairs, (Tensor, str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(
            "pairs must be an nn.Module (pairs found by reflora.adapters.find_pairs) or an iterable "
            f"of (A, B) parameter tuples / LoRAPair; got {type(pairs).__name__}"
        )
    out: list[LoRAPair] = []
    for i, item in enumerate(pairs):
        if isinstance(item, LoRAPair):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoRAPair(f"pair{i}", item[0], item[1]))
        else:
            raise TypeError(
                f"pairs[{i}] must be an (A, B) tuple of parameters or a LoRAPair; got {type(item).__name__}"
            )
    if not out:
        raise ValueError("no pairs given: RefLoRA would be a silent no-op; pass at least one (A, B) pair")
    return out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


# ------------------------------------------------------------------------------- the handle


class RefLoRAHandle:
    """What :func:`attach` returns: removes the hooks, checkpoints the step counter and caches.

    Attributes:
        pairs: the managed :class:`~reflora.LoRAPair` objects, in order.
        optimizer: the optimizer whose hooks are used (unwrapped from accelerate if needed).
        step_count: completed optimizer steps seen since attaching (or restored).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        pairs: list[LoRAPair],
        *,
        variant: str,
        space: str,
        warmup_steps: int,
        interval: int,
        eps: float | None,
        second_moment: str,
        compile: bool,
    ) -> None:
        self.optimizer = optimizer
        self.pairs: tuple[LoRAPair, ...] = tuple(pairs)
        self.variant = variant
        self.space = space
        self.warmup_steps = warmup_steps
        self.interval = interval
        self.eps = eps
        self.second_moment = second_moment
        self.compiled = compile
        self.step_count = 0
        self._skip_count = False
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._transport = get_state_transport(optimizer) if space == "parameter" else None
        self._groups = self._make_groups()
        if compile:
            self._grad_kernel = torch.compile(_gradient_kernel, fullgraph=True, dynamic=False)
            self._param_kernel = torch.compile(_parameter_kernel, fullgraph=True, dynamic=False)
        else:
            self._grad_kernel = _gradient_kernel
            self._param_kernel = _parameter_kernel
        self._hooks: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._removed = False

    # -- grouping ----------------------------------------------------------------------------
    def _make_groups(self) -> list[list[int]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pairs):
            key = (p.A.device, p.A.dtype, *p.shape, p.transposed)
            groups[key].append(i)
        return list(groups.values())

    @property
    def num_groups(self) -> int:
        """How many batched core calls one step makes (one per same-shape group)."""
        return len(self._groups)

    def _active(self, t: int) -> bool:
        return t >= self.warmup_steps and (t - self.warmup_steps) % self.interval == 0

    def _eps_for(self, dtype: torch.dtype) -> float:
        return default_eps(dtype) if self.eps is None else self.eps

    # -- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, optimizer, args, kwargs) -> None:
        self._skip_count = False
        found_inf = kwargs.get("found_inf") if kwargs else None
        if isinstance(found_inf, Tensor) and bool(found_inf.item()):
            # a fused optimizer handed GradScaler's verdict: it will skip this step itself
            self._skip_count = True
            return
        t = self.step_count
        if t < self.warmup_steps:
            return
        with torch.no_grad():
            if self.space == "gradient":
                self._gradient_step(refresh=self._active(t) or self.interval == 1)
            elif self._active(t):
                self._parameter_step()

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if not self._skip_count:
            self.step_count += 1

    def _members(self, group: list[int]) -> list[int]:
        return [i for i in group if self.pairs[i].A.grad is not None and self.pairs[i].B.grad is not None]

    def _gradient_step(self, refresh: bool) -> None:
        for group in self._groups:
            members = self._members(group)
            if not members:
                continue
            pairs = [self.pairs[i] for i in members]
            gA = torch.stack([p.grad_a() for p in pairs])
            gB = torch.stack([p.grad_b() for p in pairs])
            missing = [i for i in members if i not in self._cache]
            if refresh or missing:
                A = torch.stack([p.a() for p in pairs])
                B = torch.stack([p.b() for p in pairs])
                S, S_inv = self._grad_kernel(A, B, self.variant, self._eps_for(A.dtype))
                if self.interval > 1:
                    for k, i in enumerate(members):
                        self._cache[i] = (S[k], S_inv[k])
            else:
                S = torch.stack([self._cache[i][0] for i in members])
                S_inv = torch.stack([self._cache[i][1] for i in members])
            gA2, gB2 = _apply_metric(S, S_inv, gA, gB)
            torch._foreach_copy_([p.grad_a() for p in pairs], list(gA2.unbind(0)))
            torch._foreach_copy_([p.grad_b() for p in pairs], list(gB2.unbind(0)))

    def _parameter_step(self) -> None:
        opt = self.optimizer
        for group in self._groups:
            members = self._members(group)
            if not members:
                continue
            pairs = [self.pairs[i] for i in members]
            A = torch.stack([p.a() for p in pairs])
            B = torch.stack([p.b() for p in pairs])
            gA = torch.stack([p.grad_a() for p in pairs])
            gB = torch.stack([p.grad_b() for p in pairs])
            A2, B2, gA2, gB2, left, right = self._param_kernel(A, B, gA, gB, self.variant, self._eps_for(A.dtype))
            torch._foreach_copy_([p.a() for p in pairs], list(A2.unbind(0)))
            torch._foreach_copy_([p.b() for p in pairs], list(B2.unbind(0)))
            torch._foreach_copy_([p.grad_a() for p in pairs], list(gA2.unbind(0)))
            torch._foreach_copy_([p.grad_b() for p in pairs], list(gB2.unbind(0)))
            self._transport_state(pairs, Transform(left, right))

    def _transport_state(self, pairs: list[LoRAPair], T: Transform) -> None:
        opt = self.optimizer
        with_state = [k for k, p in enumerate(pairs) if opt.state.get(p.A) and opt.state.get(p.B)]
        if not with_state:
            return
        assert self._transport is not None
        tA, tB = pairs[0].transposed
        sel = torch.tensor(with_state, device=T.left.device)
        T_sel = Transform(T.left.index_select(0, sel), T.right.index_select(0, sel))
        chosen = [pairs[k] for k in with_state]

        def stacked(param_of, view) -> dict[str, Tensor]:
            keys = opt.state[param_of(chosen[0])].keys()
            out = {}
            for key in keys:
                vals = [opt.state[param_of(p)][key] for p in chosen]
                if all(isinstance(v, Tensor) and v.dim() >= 2 for v in vals):
                    out[key] = torch.stack([view(v) for v in vals])
            return out

        viewA = (lambda v: v.mT) if tA else (lambda v: v)
        viewB = (lambda v: v.mT) if tB else (lambda v: v)
        sA = stacked(lambda p: p.A, viewA)
        sB = stacked(lambda p: p.B, viewB)
        ctx = TransportContext(opt, self.second_moment, (tA, tB))
        newA, newB = self._transport(T_sel, sA, sB, ctx)
        for new, param_of, view in ((newA, lambda p: p.A, viewA), (newB, lambda p: p.B, viewB)):
            for key, value in new.items():
                dst = [view(opt.state[param_of(p)][key]) for p in chosen]
                torch._foreach_copy_(dst, list(value.unbind(0)))

    # -- public ------------------------------------------------------------------------------
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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume identically: config, step counter, cached metrics."""
        cache = {
            self.pairs[i].name: (S.clone(), S_inv.clone()) for i, (S, S_inv) in sorted(self._cache.items())
        }
        return {
            "step_count": self.step_count,
            "variant": self.variant,
            "space": self.space,
            "warmup_steps": self.warmup_steps,
            "interval": self.interval,
            "pair_names": [p.name for p in self.pairs],
            "cache": cache,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the configuration must match this handle's."""
        if not isinstance(state, dict) or "step_count" not in state:
            raise TypeError("state must be a dict returned by RefLoRAHandle.state_dict()")
        for key in ("variant", "space", "warmup_steps", "interval"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint was saved with {key}={state[key]!r} but this handle has "
                    f"{key}={getattr(self, key)!r}; attach with the same settings to resume"
                )
        names = [p.name for p in self.pairs]
        if state["pair_names"] != names:
            raise ValueError(
                f"checkpoint manages pairs {state['pair_names'][:3]}... ({len(state['pair_names'])}) "
                f"but this handle manages {names[:3]}... ({len(names)})"
            )
        self.step_count = int(state["step_count"])
        index = {n: i for i, n in enumerate(names)}
        self._cache = {}
        for name, (S, S_inv) in state["cache"].items():
            dev = self.pairs[index[name]].A.device
            self._cache[index[name]] = (S.to(dev), S_inv.to(dev))

    def __repr__(self) -> str:
        return (
            f"RefLoRAHandle(variant={self.variant!r}, space={self.space!r}, pairs={len(self.pairs)}, "
            f"groups={self.num_groups}, warmup_steps={self.warmup_steps}, interval={self.interval}, "
            f"step_count={self.step_count})"
        )


def attach(
    optimizer: torch.optim.Optimizer,
    pairs: nn.Module | Iterable[tuple[Tensor, Tensor] | LoRAPair],
    *,
    variant: Literal["full", "scalar"] = "full",
    space: Space = "gradient",
    warmup_steps: int = 0,
    interval: int = 1,
    eps: float | None = None,
    second_moment: Literal["square", "keep", "reset"] = "square",
    compile: bool = False,
) -> RefLoRAHandle:
    r"""Make ``optimizer`` a RefLoRA optimizer for ``pairs`` (arXiv 2505.18877).

    Args:
        optimizer: any first-order ``torch.optim.Optimizer`` (closure-only ones such as LBFGS
            are rejected). An accelerate ``AcceleratedOptimizer`` is unwrapped.
        pairs: an ``nn.Module`` (pairs found by :func:`reflora.adapters.find_pairs`) or an
            iterable of ``(A, B)`` parameter tuples (``A`` ``(r, m)``, ``B`` ``(n, r)``) or
            :class:`~reflora.LoRAPair` objects. Every factor must be in the optimizer.
        variant: ``"full"`` (RefLoRA) or ``"scalar"`` (RefLoRA-S).
        space: ``"gradient"`` (precondition gradients; any optimizer) or ``"parameter"``
            (refactor the factors and transport the optimizer state; needs a registered
            transport, see :func:`reflora.transport.register_state_transport`).
        warmup_steps: optimizer steps before RefLoRA starts (not needed for ``B = 0`` inits).
        interval: act every ``interval`` optimizer steps.
        eps: eigenvalue floor of the core (``None``: dtype default).
        second_moment: rule for element-wise second moments in parameter space
            (``"square"``: exact for the scalar variant; ``"keep"``; ``"reset"``).
        compile: run the per-group kernel through ``torch.compile(fullgraph=True)``.

    Returns:
        A :class:`RefLoRAHandle`.

    Example:
        >>> import torch
        >>> import reflora
        >>> A = torch.nn.Parameter(torch.randn(4, 32))
        >>> B = torch.nn.Parameter(torch.zeros(16, 4))
        >>> opt = torch.optim.AdamW([A, B], lr=1e-2)
        >>> handle = reflora.attach(opt, [(A, B)], variant="full", space="gradient")
        >>> loss = (B @ A - torch.ones(16, 32)).square().sum()
        >>> loss.backward(); opt.step()
        >>> handle.step_count
        1
    """
    opt = _unwrap_optimizer(optimizer)
    variant = _check_variant(variant)
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}; got {space!r}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    interval = _check_int("interval", interval, 1)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool; got {type(compile).__name__}")
    if second_moment not in _SECOND_MOMENT_RULES:
        raise ValueError(f"second_moment must be one of {_SECOND_MOMENT_RULES}; got {second_moment!r}")
    pair_list = _as_pairs(pairs)
    if eps is not None:
        _check_eps(eps, pair_list[0].A.dtype)

    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    seen: dict[int, str] = {}
    for pair in pair_list:
        for label, t in (("A", pair.A), ("B", pair.B)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"pair {pair.name!r}: {label} has dtype {t.dtype}; expected a floating dtype")
            if id(t) not in in_opt:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not a parameter "
                    f"of this {type(opt).__name__}; build the optimizer over the LoRA parameters first"
                )
            if id(t) in seen:
                raise ValueError(
                    f"pair {pair.name!r} shares its {label} factor with pair {seen[id(t)]!r}; "
                    "each factor may belong to one pair only (duplicate pairs?)"
                )
            seen[id(t)] = pair.name
        if pair.A.device != pair.B.device:
            raise ValueError(f"pair {pair.name!r}: A is on {pair.A.device} but B is on {pair.B.device}")
    registered = _ATTACHED.setdefault(opt, {})
    for pair in pair_list:
        for t in (pair.A, pair.B):
            other = registered.get(id(t))
            if other is not None and not other._removed:
                raise ValueError(
                    f"pair {pair.name!r} is already managed by {other!r} on this optimizer; "
                    "call handle.remove() first"
                )
    if space == "parameter" and get_state_transport(opt) is None:
        raise UnsupportedOptimizerError(
            f"space='parameter' must move {type(opt).__name__}'s state with the factors, and no "
            f"transport is registered for it (registered: {registered_optimizers()}). Declare its "
            f"state with reflora.transport.register_state_transport({type(opt).__name__}, "
            "{'state_key': 'first' | 'second' | 'keep', ...}), or use space='gradient', which works "
            "with any optimizer."
        )
    handle = RefLoRAHandle(
        opt,
        pair_list,
        variant=variant,
        space=space,
        warmup_steps=warmup_steps,
        interval=interval,
        eps=eps,
        second_moment=second_moment,
        compile=compile,
    )
    for pair in pair_list:
        registered[id(pair.A)] = handle
        registered[id(pair.B)] = handle
    return handle
