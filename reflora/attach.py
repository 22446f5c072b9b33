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

Pairs are grouped by ``(device, dtype, experts, r, m, n, layout)`` and each group is computed by
one batched call of the functional core (one batched ``eigh`` per group, not one per layer);
results are written back with ``copy_`` under ``no_grad``. A pair stacking ``E`` MoE experts
(:attr:`reflora.LoRAPair.experts`) is ``E`` independent pairs: a group of them stacks to
``(G, E, r, m)`` and every expert gets its own ``S``.

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

from reflora._linalg import compute_dtype, default_eps
from reflora.functional import (
    _SECOND_MOMENT_RULES,
    Transform,
    _check_eps,
    _check_variant,
    _full_from_grams,
    _grams,
    _metric,
    _scalar_from_sq_norms,
)
from reflora.pairs import LoRAPair, to_core
from reflora.transport import TransportContext, get_state_transport, registered_optimizers

__all__ = ["RefLoRAHandle", "UnsupportedOptimizerError", "attach"]

Space = Literal["gradient", "parameter"]
_SPACES = ("gradient", "parameter")

# optimizer -> {param id: handle}; guards against attaching twice to the same parameters.
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RefLoRAHandle]]" = (
    weakref.WeakKeyDictionary()
)


class UnsupportedOptimizerError(TypeError):
    """The optimizer cannot be used with the requested RefLoRA mode."""


# ------------------------------------------------------------------------------- kernels
# Per same-shape group: the Grams (O((m + n) r^2)), one batched r x r kernel (two batched eighs
# for the whole group instead of two per layer), and the r x r transforms applied to the factors /
# gradients, written back with copy_. ``compile=True`` hands the
# r x r kernel below to torch.compile (static shapes per group: no recompiles from step to step).


def _full_kernel(X: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(left, right, S, S^{-1})`` of a stack of pairs from their Grams (compute dtype)."""
    T = _full_from_grams(X, Y, eps)
    return (*T, *_metric(T))


# Above this many elements per factor the big ops are bandwidth-bound: stacking would add a copy
# of every factor for nothing, so they run per pair in place; below it they are launch-bound and
# one batched matmul over the stacked group is faster. (Measured on CPU, benchmarks/overhead.py.)
_STACK_MAX_NUMEL = 1 << 16


def _gram_stack(pairs: list[LoRAPair]) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)`` of a group, stacked, in the compute dtype."""
    if pairs[0].A.numel() <= _STACK_MAX_NUMEL:
        return _grams(torch.stack([p.a() for p in pairs]), torch.stack([p.b() for p in pairs]))
    X, Y = zip(*(_grams(p.a(), p.b()) for p in pairs))
    return torch.stack(X), torch.stack(Y)


def _sq_norms(tensors: list[Tensor]) -> Tensor:
    """Squared Frobenius norms of core views: ``(G,)`` for 2-D factors, ``(G, E)`` per expert."""
    cd = compute_dtype(tensors[0].dtype)
    if tensors[0].dim() == 2:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=cd)).square()
    # one norm per expert: a norm over the whole stack would give every expert the same scale
    return torch.stack([torch.linalg.vector_norm(t, dim=(-2, -1), dtype=cd) for t in tensors]).square()


def _scale_inplace(xs: list[Tensor], s: Tensor) -> None:
    """``x_i <- s[i] * x_i``; ``s`` is ``(G, 1, 1)`` (a scalar per pair) or ``(G, E, 1, 1)`` (per expert)."""
    s = s.to(xs[0].dtype)
    if s.dim() == 3:
        torch._foreach_mul_(xs, list(s.flatten().unbind(0)))
        return
    for x, f in zip(xs, s.unbind(0)):
        x.mul_(f)  # (E, 1, 1) broadcasts over each expert's block of the (E, r, m) view


def _left_inplace(T: Tensor, xs: list[Tensor]) -> None:
    """``x_i <- T[i] @ x_i`` for every ``x_i`` (computed in T's dtype, written back with copy_)."""
    if xs[0].numel() <= _STACK_MAX_NUMEL:
        out = T @ torch.stack(xs).to(T.dtype)
        torch._foreach_copy_(xs, list(out.unbind(0)))
        return
    for t, x in zip(T.unbind(0), xs):
        x.copy_(t @ x.to(t.dtype))


def _right_inplace(xs: list[Tensor], T: Tensor) -> None:
    """``x_i <- x_i @ T[i]``."""
    if xs[0].numel() <= _STACK_MAX_NUMEL:
        out = torch.stack(xs).to(T.dtype) @ T
        torch._foreach_copy_(xs, list(out.unbind(0)))
        return
    for t, x in zip(T.unbind(0), xs):
        x.copy_(x.to(t.dtype) @ t)


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
        self._kernel = torch.compile(_full_kernel, fullgraph=True, dynamic=False) if compile else _full_kernel
        self._hooks: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._removed = False

    # -- grouping ----------------------------------------------------------------------------
    def _make_groups(self) -> list[list[int]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pairs):
            key = (p.A.device, p.A.dtype, p.experts, *p.shape, p.layout)
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

    def _metric(self, pairs: list[LoRAPair]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(left, right, S, S^{-1})`` for a group: ``(G, r, r)``, or ``(G, 1, 1)`` for the
        scalar variant; pairs with experts add an expert dimension, ``(G, E, ., .)``."""
        if self.variant == "scalar":
            T = _scalar_from_sq_norms(_sq_norms([p.a() for p in pairs]), _sq_norms([p.b() for p in pairs]))
            return (*T, *_metric(T))
        X, Y = _gram_stack(pairs)
        return self._kernel(X, Y, self._eps_for(pairs[0].A.dtype))

    def _gradient_step(self, refresh: bool) -> None:
        for group in self._groups:
            members = self._members(group)
            if not members:
                continue
            pairs = [self.pairs[i] for i in members]
            if refresh or any(i not in self._cache for i in members):
                _, _, S, S_inv = self._metric(pairs)
                if self.interval > 1:
                    for k, i in enumerate(members):
                        self._cache[i] = (S[k], S_inv[k])
            else:
                S = torch.stack([self._cache[i][0] for i in members])
                S_inv = torch.stack([self._cache[i][1] for i in members])
            gA = [p.grad_a() for p in pairs]
            gB = [p.grad_b() for p in pairs]
            if self.variant == "scalar":
                _scale_inplace(gA, S_inv)
                _scale_inplace(gB, S)
            else:
                _left_inplace(S_inv, gA)
                _right_inplace(gB, S)

    def _parameter_step(self) -> None:
        for group in self._groups:
            members = self._members(group)
            if not members:
                continue
            pairs = [self.pairs[i] for i in members]
            left, right, _, _ = self._metric(pairs)
            As, Bs = [p.a() for p in pairs], [p.b() for p in pairs]
            gA, gB = [p.grad_a() for p in pairs], [p.grad_b() for p in pairs]
            if self.variant == "scalar":
                _scale_inplace(As, left)  # p A
                _scale_inplace(Bs, right)  # B / p
                _scale_inplace(gA, right)  # P^-1 grad_A
                _scale_inplace(gB, left)  # grad_B P
            else:
                _left_inplace(left, As)
                _right_inplace(Bs, right)
                _left_inplace(right.mT, gA)
                _right_inplace(gB, left.mT)
            self._transport_state(pairs, Transform(left, right))

    def _transport_state(self, pairs: list[LoRAPair], T: Transform) -> None:
        opt = self.optimizer
        with_state = [k for k, p in enumerate(pairs) if opt.state.get(p.A) and opt.state.get(p.B)]
        if not with_state:
            return
        assert self._transport is not None
        layA, layB = pairs[0].layout
        experts = pairs[0].experts
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

        def view_for(layout, param_shape):
            # state shaped like the parameter gets the parameter's view; other shapes (factored
            # states) are left to the transport, which sees the layout in its context
            return lambda v: to_core(v, layout, experts) if v.shape == param_shape else v

        viewA = view_for(layA, chosen[0].A.shape)
        viewB = view_for(layB, chosen[0].B.shape)
        sA = stacked(lambda p: p.A, viewA)
        sB = stacked(lambda p: p.B, viewB)
        ctx = TransportContext(opt, self.second_moment, (layA, layB))
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
