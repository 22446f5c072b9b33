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
* ``space="auto"`` (default) picks one of the two per optimizer family, from measurements:
  ``"parameter"`` for Adam-like optimizers (a registered transport with second moments),
  ``"gradient"`` otherwise; see :func:`default_space`.

Pairs are grouped by ``(device, dtype, experts, r, m, n, layout)`` and each group is computed by
one batched call of the functional core (one batched ``eigh`` per group, not one per layer);
results are written back with ``copy_`` under ``no_grad``. A pair stacking ``E`` MoE experts
(:attr:`reflora.LoRAPair.experts`) is ``E`` independent pairs: a group of them stacks to
``(G, E, r, m)`` and every expert gets its own ``S``.

Distributed training (README, "Multi-GPU and multi-node"): under DDP the factors are replicated
and nothing changes. FSDP2 factors are ``DTensor`` shards: each rank forms partial Grams (or
squared norms) from its own shard, one all-reduce per same-shape group sums them, and every
transform stays on the rank's shard (:mod:`reflora.distributed`). Under DeepSpeed ZeRO-1/2 the
gradient-space modes precondition the gradients before DeepSpeed reduces them
(:mod:`reflora.integrations.deepspeed`).

Semantics (documented in the README too):

* ``warmup_steps`` and ``interval`` count *optimizer steps* (so gradient accumulation does not
  inflate them). A step that ``GradScaler`` skips (inf/NaN gradients) neither acts nor counts:
  for most optimizers the scaler does not call ``optimizer.step()`` at all; optimizers that
  handle AMP scaling themselves (``fused=True`` Adam / AdamW / SGD / Adagrad) are stepped with
  ``optimizer.found_inf`` / ``optimizer.grad_scale`` set, and the pre-hook reads ``found_inf``
  (or a ``found_inf=`` keyword of ``step()``) and leaves the skipped step alone.
* RefLoRA acts at steps ``t >= warmup_steps`` with ``(t - warmup_steps) % interval == 0``
  (``t`` counts completed optimizer steps from 0). In gradient space the preconditioner ``S`` is
  recomputed at those steps and the cached ``S`` (O(r^2) per pair) is applied in between; in
  parameter space the factors are refactored at those steps only.
* Gradient clipping called before ``optimizer.step()`` clips the raw gradients; the
  preconditioned ones are not clipped again.
* Pairs whose ``A.grad`` or ``B.grad`` is ``None`` this step (frozen, unused) are skipped.
* With ``warmup_steps`` longer than the run, nothing is touched: the run is bit-identical to
  the bare optimizer.
* Inside ``torch.compile`` (a compiled ``opt.step()`` or train step) the hooks do not branch in
  Python on the step: the counter is a 0-d tensor advanced in place, warmup / interval / a
  scaler's skip are a 0-d bool tensor and every update is selected with ``torch.where``, so one
  graph serves every step (the r x r kernel then runs every step; eager steps skip it).
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from reflora._kernels import (
    SECOND_MOMENT_RULES,
    check_eps,
    UnstableOptionWarning,
    resolve_resolved,
    check_solver,
    check_variant,
    eager_kernel,
    full_kernel,
    grams,
    metric,
    metric_kernel,
    scalar_kernel,
)
from reflora._linalg import compute_dtype, default_eps, mm
from reflora.diagnostics import _group_stats, pair_stats, rows_in_order
from reflora.distributed import any_sharded, group_key, local, localize, reduce_grams, reduce_sq_norms
from reflora.functional import Transform
from reflora.integrations.deepspeed import check_zero, check_zero_stage, zero_optimizer
from reflora.integrations.deepspeed import handle_class as zero_handle_class
from reflora.pairs import LoRAPair, canonical_name, to_core
from reflora.transport import (
    TransportContext,
    UnsupportedOptimizerError,
    _qualname,
    get_state_transport,
    registered_optimizers,
)

__all__ = ["RefLoRAHandle", "UnstableOptionWarning", "UnsupportedOptimizerError", "attach", "default_space"]

Space = Literal["auto", "gradient", "parameter"]
_SPACES = ("auto", "gradient", "parameter")

# optimizer -> {param id: handle}; guards against attaching twice to the same parameters.
_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RefLoRAHandle]]" = (
    weakref.WeakKeyDictionary()
)


# ------------------------------------------------------------------------------- kernels
# Per same-shape group: the Grams (O((m + n) r^2), float64), one batched r x r kernel (three or
# four batched eighs for the whole group instead of per layer, float64), and the r x r transforms
# applied to the factors / gradients / state in float32 or wider, written back with copy_.
# ``compile=True`` hands the r x r kernel to torch.compile.


# Above this many elements per factor the big ops are bandwidth-bound: stacking would add a copy
# of every factor for nothing, so they run per pair in place; below it they are launch-bound and
# one batched matmul over the stacked group is faster. (Measured on CPU, benchmarks/overhead.py.)
_STACK_MAX_NUMEL = 1 << 16
# The same for the scalar variant's norms, whose reduction is cheaper than a copy sooner: stacking
# wins below about 4096 elements per factor (measured: 2.9x faster at 1024, 1.2x at 4096, 0.9x at
# 8192, 0.6x at 12288 for 12 factors).
_NORM_STACK_MAX_NUMEL = 1 << 12


def _gram_stack(pairs: list[LoRAPair]) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)`` of a group, stacked, in the compute dtype.

    Sharded factors (FSDP2 ``DTensor`` s) give this rank's partial Grams, summed over the ranks
    by one collective (:func:`reflora.distributed.reduce_grams`).
    """
    a0, b0 = pairs[0].a(), pairs[0].b()
    if pairs[0].A.numel() > _STACK_MAX_NUMEL:
        Xs, Ys = zip(*(grams(p.a(), p.b()) for p in pairs))
        X, Y = torch.stack(Xs), torch.stack(Ys)
    elif a0.shape == b0.mT.shape and a0.dtype == b0.dtype:
        # square layer (m == n): A and B^T stack into one (2G, r, m) product, Y = (B^T)(B^T)^T
        Z = torch.stack([p.a() for p in pairs] + [p.b().mT for p in pairs]).to(compute_dtype(a0.dtype))
        XY = mm(Z, Z.mT)
        X, Y = XY[: len(pairs)], XY[len(pairs):]
    else:
        X, Y = grams(torch.stack([p.a() for p in pairs]), torch.stack([p.b() for p in pairs]))
    return reduce_grams(pairs, X, Y)  # distributed hook: a no-op for unsharded pairs


def _sq_norms(tensors: list[Tensor]) -> Tensor:
    """Squared Frobenius norms of core views: ``(G,)`` for 2-D factors, ``(G, E)`` per expert."""
    cd = compute_dtype(tensors[0].dtype)
    if tensors[0].numel() <= _NORM_STACK_MAX_NUMEL:  # launch-bound: one stacked reduction
        # (per expert for (E, ., .) views: a norm over the whole stack would give every expert the same scale)
        return torch.linalg.vector_norm(torch.stack(tensors), dim=(-2, -1), dtype=cd).square()
    if tensors[0].dim() == 2:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=cd)).square()
    return torch.stack([torch.linalg.vector_norm(t, dim=(-2, -1), dtype=cd) for t in tensors]).square()


def _copy_gated(xs: list[Tensor], new: list[Tensor] | tuple[Tensor, ...], gate: Tensor | None) -> None:
    """``x_i <- new_i``, or, under a traced step, ``x_i <- where(gate, new_i, x_i)``.

    A compiled step must not branch in Python on the step counter (every step would be a new
    guard value, i.e. a recompile), so it computes every update and keeps the old value where
    the 0-d ``gate`` is false. Selecting the *output* (not scaling the transform to the identity)
    leaves non-finite values and the ``second_moment="reset"`` rule exactly as they were.
    """
    if gate is not None:
        new = [torch.where(gate, n, x) for n, x in zip(new, xs)]
    torch._foreach_copy_(xs, new)


def _apply_dtype(T: Tensor, x: Tensor) -> Tensor:
    """``T`` in the dtype the transforms are applied in: float32, or float64 for float64 factors.

    The kernel is float64 for accuracy (the Grams); applying its ``r x r`` result to the big
    factors, gradients and state in float32 costs half as much and changes ``B A`` by about
    ``machine_eps(float32) * cond(P)`` of ``||A|| ||B||`` per refactor (``P`` is near the identity
    once the pair is balanced).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # (factors are floating point)
    return T if T.dtype == dtype else T.to(dtype)


def _scalars_in_place(chunks: list[tuple[list[Tensor], Tensor]]) -> bool:
    """Whether ``chunks`` are scalar transforms, one per tensor (``(G, 1, 1)``), on tensors of one
    device and one dtype that is float32 or wider: then one in-place foreach product does them all."""
    if not all(T.dim() == 3 and T.shape[-1] == 1 for _, T in chunks):
        return False
    xs = [x for chunk, _ in chunks for x in chunk]
    return len({(x.dtype, x.device) for x in xs}) == 1 and xs[0].dtype in (torch.float32, torch.float64)


def _apply_many(
    left: list[tuple[list[Tensor], Tensor]],
    right: list[tuple[list[Tensor], Tensor]] = (),  # type: ignore[assignment]
    gate: Tensor | None = None,
) -> None:
    """``x <- T[i] @ x`` for every chunk ``(xs, T)`` of ``left`` and ``x <- x @ T[i]`` for every
    chunk of ``right`` (``xs`` of one shape per chunk; a scalar ``T``, ``(G, [E,] 1, 1)``, multiplies).

    Small tensors (launch-bound) go through one stacked product per ``(dtype, device, shape)``
    for everything at once (factors, gradients and optimizer state, every group, both sides: a
    right product ``x T`` is done as ``(T^T x^T)^T`` on the transposed view), large ones
    (bandwidth-bound) one at a time, in place of a copy of the whole group.
    """
    chunks = [("left", xs, T) for xs, T in left if xs] + [("right", xs, T) for xs, T in right if xs]
    if not chunks:
        return
    as_left = [(xs, T) for _, xs, T in chunks]
    if gate is None and _scalars_in_place(as_left):
        # one scalar per tensor: every chunk (any shapes, any groups) multiplied in place by one
        # foreach call, in float32 or wider; nothing stacked or copied back
        T = torch.cat([T.flatten() for _, T in as_left]).to(as_left[0][0][0].dtype)
        torch._foreach_mul_([x for xs, _ in as_left for x in xs], list(T.unbind(0)))
        return
    buckets: dict[tuple, list[tuple[list[Tensor], Tensor]]] = defaultdict(list)
    for side, xs, T in chunks:
        if xs[0].numel() > _STACK_MAX_NUMEL:
            scalar = T.shape[-1] == 1
            for t, x in zip(_apply_dtype(T, xs[0]).unbind(0), xs):  # no second copy of the group
                y = x.to(t.dtype)
                new = t * y if scalar else (t @ y if side == "left" else y @ t)
                _copy_gated([x], [new], None if gate is None else gate.to(x.device))
            continue
        if side == "right" and T.shape[-1] != 1:
            xs, T = [x.mT for x in xs], T.mT  # x T = (T^T x^T)^T, written through the transposed view
        buckets[(xs[0].dtype, xs[0].device, xs[0].shape, T.shape[-1] == 1)].append((xs, T))
    for (dtype, device, _, scalar), group in buckets.items():
        # (no no-op calls here: on a small model every call counts, see benchmarks/overhead.py (c))
        xs = [x for chunk, _ in group for x in chunk]
        T = _apply_dtype(torch.cat([T for _, T in group]) if len(group) > 1 else group[0][1], xs[0])
        X = torch.stack(xs)
        if dtype != T.dtype:
            X = X.to(T.dtype)
        out = T * X if scalar else mm(T, X)
        _copy_gated(xs, out.unbind(0), None if gate is None else gate.to(device))


# ------------------------------------------------------------------------------- compile=True
# Eager steps with compile=True run the r x r kernel through torch.compile. The kernel sees the
# Grams only, (G, [E,] r, r): its graphs depend on r, E, the dtype, the device, eps, frame and the
# group size G. Dynamo keeps compiled graphs, and counts recompiles against its limit (8), per
# *code object*, so one compiled function shared by every shape crashed a PEFT model with 9 or
# more distinct ranks (rank_pattern). Here every key gets its own copy of the kernel's code object
# (its own cache), and G is padded to a power of two, so a group whose member set varies (MoE
# routing, conditional branches) needs at most log2(G) + 1 graphs. A key that would need more
# than _MAX_GRAPHS_PER_KEY graphs runs eagerly (one warning), never crashes.

_MAX_GRAPHS_PER_KEY = 6
_BACKEND = "inductor"  # tests swap in "eager": same dynamo caches and guards, no code generation
_COMPILED: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}
_COMPILED_SIZES: dict[tuple, set[int]] = defaultdict(set)
_WARNED: set[tuple] = set()


def _fresh_compiled_kernel() -> Callable[..., tuple[Tensor, ...]]:
    # a new code object (equal to full_kernel's) is what gives this key a cache of its own
    fn = types.FunctionType(
        full_kernel.__code__.replace(), full_kernel.__globals__, full_kernel.__name__,
        full_kernel.__defaults__, full_kernel.__closure__,
    )
    fn.__doc__, fn.__qualname__ = full_kernel.__doc__, full_kernel.__qualname__
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=_BACKEND)


def _bucket(G: int) -> int:
    return 1 << (G - 1).bit_length()


def compiled_full_kernel(
    X: Tensor, Y: Tensor, eps: float, frame: str, solver: str = "eigh", resolved: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`full_kernel` through a per-key ``torch.compile`` cache, padded to a bounded set of shapes.

    Padding rows are identity Grams (a balanced pair: finite outputs) and are dropped again.
    """
    G = X.shape[0]
    key = (tuple(X.shape[1:]), X.dtype, X.device, float(eps), frame, solver, float(resolved), _BACKEND)
    size = _bucket(G)
    sizes = _COMPILED_SIZES[key]
    if size not in sizes and len(sizes) >= _MAX_GRAPHS_PER_KEY:
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"reflora compile=True: Grams of shape {key[0]} ({X.dtype}, {X.device}) came in "
                f"{len(sizes) + 1} group sizes; running that kernel eagerly from now on instead of "
                "recompiling it again (results are the same)",
                stacklevel=4,
            )
        return full_kernel(X, Y, eps, frame, solver, resolved)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = _fresh_compiled_kernel()
    sizes.add(size)
    if size != G:
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand(size - G, *X.shape[1:])
        X, Y = torch.cat([X, eye]), torch.cat([Y, eye])
    out = fn(X, Y, eps, frame, solver, resolved)
    return out if size == G else tuple(t[:G] for t in out)  # type: ignore[return-value]


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
            f"{_qualname(optimizer)}.step requires a closure: it re-evaluates the loss several "
            "times per step, and RefLoRA's per-step preconditioning / refactoring would have to run "
            "inside every evaluation. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
        )
    return optimizer


def _keeps_second_moments(transport: Any) -> bool:
    """Whether a registered transport moves element-wise second moments (an Adam-like optimizer).

    A spec transport says so with a ``"second"`` kind (Adam, AdamW, NAdam, RAdam, RMSprop,
    Adagrad); a function transport is taken to (the built-in ones move Adafactor's factored
    second moments). SGD's spec holds a ``"first"`` kind only."""
    spec = getattr(transport, "spec", None)
    return spec is None or "second" in spec.values()


def default_space(optimizer: Any) -> Literal["gradient", "parameter"]:
    """The space ``attach(optimizer, pairs)`` uses (``space="auto"``), from the optimizer alone.

    ============================================  ===============  ==================================
    optimizer                                     ``"auto"``       why (README, "Defaults (measured)")
    ============================================  ===============  ==================================
    registered transport with second moments      ``"parameter"``  AdamW, full variant: refactoring
    (Adam, AdamW, NAdam, RAdam, RMSprop,                           beats plain LoRA on 14/15 seeds,
    Adagrad, Adafactor: Adam-like)                                 gradient space on 3/15; RMSprop:
                                                                   14/15 and 15/15 (momentum 0.9)
    registered transport with first moments only  ``"gradient"``   SGD momentum 0.9, full variant:
    (SGD)                                                          gradient space 15/15, parameter
                                                                   space 9/15; momentum 0: the two
                                                                   spaces are the same trajectory
    no registered transport                       ``"gradient"``   parameter space would need one
    DeepSpeed ZeRO optimizer                      ``"gradient"``   parameter space is unsupported
    ============================================  ===============  ==================================

    Subclasses follow their nearest registered base class (as
    :func:`reflora.transport.get_state_transport` does). :func:`attach` then falls back from
    ``"parameter"`` to ``"gradient"`` where the pairs make parameter space unsupported: FSDP2
    (``DTensor``) factors with a function transport (Adafactor), ``solver="newton_schulz"`` with
    a full-variant pair of rank above its layer's size, and (with a warning) optimizer state
    that the transport cannot move. ``handle.space`` reports what was used.

    Args:
        optimizer: the optimizer ``attach`` would get (accelerate / DeepSpeed wrappers included).

    Returns:
        ``"parameter"`` or ``"gradient"``.

    Example:
        >>> import torch
        >>> import reflora
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> reflora.default_space(torch.optim.AdamW([w])), reflora.default_space(torch.optim.SGD([w], lr=0.1))
        ('parameter', 'gradient')
    """
    if zero_optimizer(optimizer) is not None:
        return "gradient"
    transport = get_state_transport(_unwrap_optimizer(optimizer))
    return "parameter" if transport is not None and _keeps_second_moments(transport) else "gradient"


def _resolve_auto(
    opt: torch.optim.Optimizer, zero: Any, pairs: list[LoRAPair], variant: str, solver: str, second_moment: str
) -> Literal["gradient", "parameter"]:
    """``space="auto"``: :func:`default_space`, then the pair-level fallbacks it documents."""
    if zero is not None or default_space(opt) == "gradient":
        return "gradient"
    transport = get_state_transport(opt)
    if getattr(transport, "spec", None) is None and any_sharded(pairs):
        return "gradient"  # attach refuses function transports on sharded factors
    if solver == "newton_schulz" and variant == "full" and any(p.shape[0] > min(p.shape[1], p.shape[2]) for p in pairs):
        return "gradient"  # attach refuses this in parameter space (NaN measured)
    try:
        _check_transportable(opt, transport, second_moment, pairs)
    except Exception as err:  # noqa: BLE001 - any refusal of the transport means: not parameter space
        warnings.warn(
            f"space='auto': {_qualname(opt)} would use space='parameter', but its state cannot be moved "
            f"({type(err).__name__}: {err}); using space='gradient'",
            stacklevel=3,
        )
        return "gradient"
    return "parameter"


def _check_transportable(opt: torch.optim.Optimizer, transport: Any, second_moment: str, pairs: Iterable[LoRAPair]) -> None:
    """Raise (before anything is modified) if ``transport`` cannot move these pairs' state."""
    check = getattr(transport, "check", None)
    if check is None:
        return
    for pair in pairs:
        ctx = TransportContext(opt, second_moment, pair.layout)
        for label, param in (("A", pair.A), ("B", pair.B)):
            state = opt.state.get(param)
            if state:
                check(state, param, ctx, f"factor {label} of pair {pair.name!r}")


def _as_pairs(pairs: Any, example_inputs: Any = None) -> list[LoRAPair]:
    if isinstance(pairs, nn.Module):
        from reflora.adapters import find_pairs

        return find_pairs(pairs, example_inputs=example_inputs)
    if example_inputs is not None:
        raise TypeError(
            "example_inputs= is for finding pairs in a model: pass the nn.Module as pairs, or leave "
            f"example_inputs out when passing explicit pairs (got pairs of type {type(pairs).__name__})"
        )
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


def _skip_rank_above_size(pairs: list[LoRAPair], mode: str) -> list[LoRAPair]:
    above = [p for p in pairs if p.shape[0] > min(p.shape[1], p.shape[2])]
    if not above or mode == "act":
        return pairs
    names = ", ".join(f"{p.name!r} (r={p.shape[0]}, m={p.shape[1]}, n={p.shape[2]})" for p in above[:4])
    more = f" and {len(above) - 4} more" if len(above) > 4 else ""
    if len(above) == len(pairs):
        raise ValueError(
            f"every pair has a rank above its layer's size (r > min(m, n)): {names}{more}. Such pairs are "
            "skipped by default (rank_above_size='skip'), which would leave nothing to manage. Pass "
            "rank_above_size='act' to apply RefLoRA to their live directions, or check that A is "
            "(r, m) = lora_A.weight and B is (n, r) = lora_B.weight (not swapped)"
        )
    warnings.warn(
        f"leaving {len(above)} pair(s) whose rank exceeds the layer's size (r > min(m, n)) to the bare "
        f"optimizer: {names}{more}. B A can use at most min(m, n) of their r directions; pass "
        "rank_above_size='act' to apply RefLoRA to them anyway",
        stacklevel=3,
    )
    return [p for p in pairs if p.shape[0] <= min(p.shape[1], p.shape[2])]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


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
        frame: str = "paper",
        solver: str = "eigh",
        diagnostics_interval: int = 0,
        resolved: float = 0.0,
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
        self.frame = frame
        self.solver = solver
        self.resolved = resolved
        self.diagnostics_interval = diagnostics_interval
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
        self._transport = get_state_transport(optimizer) if space == "parameter" else None
        self._groups = self._make_groups()
        self._bufs = self._make_cache_buffers()
        self._cached: set[int] | None = set()  # Python mirror of the buffers' `valid` flags
        self._hooks: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self._removed = False

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
        if self.space != "gradient" or self.interval == 1:
            return None
        bufs = []
        for group in self._groups:
            p = self.pairs[group[0]]
            r = 1 if self.variant == "scalar" else p.rank
            shape = (len(group), *((p.experts,) if p.experts > 1 else ()), r, r)
            kw = dict(dtype=compute_dtype(p.A.dtype), device=p.A.device)
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
    def _cache(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{pair index: (S, S^{-1})}`` of the cached metrics (views of the buffers)."""
        if self._bufs is None:
            return {}
        cached = self._cached_pairs()
        return {
            i: (S[j], S_inv[j])
            for group, (S, S_inv, _) in zip(self._groups, self._bufs)
            for j, i in enumerate(group)
            if i in cached
        }

    # -- grouping ----------------------------------------------------------------------------
    def _make_groups(self) -> list[list[int]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pairs):
            key = (p.A.device, p.A.dtype, p.experts, *p.shape, p.layout, group_key(p))
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
        if torch.compiler.is_compiling():
            self._traced_pre_hook(optimizer, kwargs)
            return
        self._skip_count = False
        if _scaler_skips(optimizer, kwargs):
            # the optimizer will skip this step itself: touch nothing, count nothing
            self._skip_count = True
            return
        # With a fused optimizer under GradScaler the gradients seen here are still *scaled* by
        # grad_scale (the fused kernel unscales them). That is harmless: the metric and the
        # refactor depend on the factors only, and every gradient map (S^-1 g, g S, P^-1 g,
        # g P) is linear, so it commutes with the kernel's division by grad_scale.
        t = self.step_count
        due = self.diagnostics_interval > 0 and t % self.diagnostics_interval == 0
        self._diag_parts = [] if due else None
        if due and self.space == "parameter" and self.variant == "scalar" and self._active(t):
            # this step rescales the factors and computes no Grams: take the stats before it does
            groups = [[self.pairs[i] for i in g] for g in self._groups]
            with torch.no_grad():
                self._diag_parts = list(zip(groups, _group_stats(groups, self.variant, self.eps)))
        try:
            with torch.no_grad():
                if t >= self.warmup_steps:
                    if self.space == "gradient":
                        self._gradient_step(refresh=self._active(t) or self.interval == 1)
                    elif self._active(t):
                        self._parameter_step()
                if due:
                    self._finish_diagnostics(t)
        finally:
            self._diag_parts = None

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
        t = self._step
        started = t >= self.warmup_steps
        if isinstance(proceeds, Tensor):
            started = started & proceeds.to(t.device)
        active = started if self.interval == 1 else started & ((t - self.warmup_steps) % self.interval == 0)
        with torch.no_grad():
            if self.space == "gradient":
                self._gradient_step(refresh=True, gate=started, refresh_gate=active)
            else:
                self._parameter_step(gate=active)

    def _post_hook(self, optimizer, args, kwargs) -> None:
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
            return
        if not self._skip_count:
            self._count = self.step_count + 1
            self._step.add_(1)

    def _members(self, group: list[int]) -> list[int]:
        return [i for i in group if self.pairs[i].A.grad is not None and self.pairs[i].B.grad is not None]

    def _kernel_call(self, X: Tensor, Y: Tensor, transform: bool) -> tuple[Tensor, ...]:
        """The r x r kernel on a stack of Grams: the transform ``(left, right)`` if ``transform``
        (parameter space), else ``(S, S^{-1})`` (gradient space: the frame does not enter ``S``,
        so the paper frame's rotation and Newton-Schulz's square roots are skipped).

        Traced (inside an outer ``torch.compile``): the general kernel, traced into that graph.
        ``compile=True``: the per-key compiled kernel. Eager on CPU with ``eigh``:
        :func:`~reflora._kernels.eager_kernel`, two ``eigh`` instead of three or four for pairs
        whose directions are all live (the same answer to round-off; it syncs with the host to
        decide, which CUDA steps must not, so they take the general kernel).
        """
        eps = self._eps_for(X.dtype)
        frame, solver, res = self.frame, self.solver, self.resolved
        if torch.compiler.is_compiling():
            return full_kernel(X, Y, eps, frame, solver, res)[:2] if transform else metric_kernel(X, Y, eps, solver, res)
        if self.compiled:
            out = compiled_full_kernel(X, Y, eps, frame if transform else "symmetric", solver, res)
            return out[:2] if transform else out[2:]
        if solver == "eigh" and X.device.type == "cpu" and (frame == "paper" or not transform):
            if transform:
                return eager_kernel(
                    X, Y, eps, "paper", lambda x, y: full_kernel(x, y, eps, "paper", solver, res)[:2],
                    metric=False, resolved=res,
                )
            return eager_kernel(X, Y, eps, None, lambda x, y: metric_kernel(x, y, eps, solver, res), resolved=res)
        return full_kernel(X, Y, eps, frame, solver, res)[:2] if transform else metric_kernel(X, Y, eps, solver, res)

    def _metrics(self, jobs: list[list[LoRAPair]], transform: bool) -> list[tuple[Tensor, ...]]:
        """Per group of ``jobs``: ``(left, right)`` if ``transform`` else ``(S, S^{-1})``,
        ``(G, r, r)`` (``(G, 1, 1)`` for the scalar variant; experts add a dimension, ``(G, E, ., .)``).

        The kernel depends on the Grams only, so groups whose Grams have the same shape (same
        rank, different layer sizes) share one batched kernel call: a model with several layer
        shapes pays the kernel's fixed cost once per rank, not once per shape.
        """
        if self.variant == "scalar":
            # distributed hook: sharded factors give partial norms, summed by one collective per group
            stats = [reduce_sq_norms(pairs, _sq_norms([p.a() for p in pairs]), _sq_norms([p.b() for p in pairs]))
                     for pairs in jobs]
        else:
            stats = [_gram_stack(pairs) for pairs in jobs]
            if self._diag_parts is not None:  # a diagnostics step: reuse this step's Grams
                self._diag_parts += [(pairs, pair_stats(X, Y, "full", self.eps)) for pairs, (X, Y) in zip(jobs, stats)]
        batches: dict[tuple, list[int]] = defaultdict(list)
        for k, (X, _) in enumerate(stats):
            batches[(X.device, X.shape[1:])].append(k)
        out: list[tuple[Tensor, ...]] = [()] * len(jobs)
        for ks in batches.values():
            X = stats[ks[0]][0] if len(ks) == 1 else torch.cat([stats[k][0] for k in ks])
            Y = stats[ks[0]][1] if len(ks) == 1 else torch.cat([stats[k][1] for k in ks])
            if self.variant == "scalar":
                left, right = scalar_kernel(X, Y)
                res: tuple[Tensor, ...] = (left, right) if transform else metric(left, right)
            else:
                res = self._kernel_call(X, Y, transform)
            if len(ks) == 1:
                out[ks[0]] = res
                continue
            parts = [t.split([stats[k][0].shape[0] for k in ks]) for t in res]
            for j, k in enumerate(ks):
                out[k] = tuple(part[j] for part in parts)
        return out

    def _gradient_step(
        self, refresh: bool, gate: Tensor | None = None, refresh_gate: Tensor | None = None
    ) -> None:
        """Precondition the gradients. Eager: ``refresh`` says whether ``S`` is recomputed (else
        the cached one is applied). Traced: ``gate`` (started, not skipped) and ``refresh_gate``
        (a refresh step) are 0-d bool tensors and ``S`` is computed every step."""
        work = []  # (group index, group, members, pairs, needs a fresh S)
        for g, group in enumerate(self._groups):
            members = self._members(group)
            if members:
                fresh = gate is not None or refresh or any(i not in self._cached_pairs() for i in members)
                work.append((g, group, members, [self.pairs[i] for i in members], fresh))
        fresh_metrics = iter(self._metrics([w[3] for w in work if w[4]], transform=False))
        on_a: list[tuple[list[Tensor], Tensor]] = []
        on_b: list[tuple[list[Tensor], Tensor]] = []
        for g, group, members, pairs, fresh in work:
            bufs = None if self._bufs is None else self._bufs[g]
            if gate is not None:
                gate = gate.to(pairs[0].A.device)
                S, S_inv = next(fresh_metrics)
                if bufs is not None:
                    assert refresh_gate is not None
                    S, S_inv = self._traced_cache(bufs, group, members, S, S_inv, gate, refresh_gate.to(gate.device))
            elif fresh:
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
            on_a.append(([p.grad_a() for p in pairs], S_inv))  # S^{-1} grad_A
            on_b.append(([p.grad_b() for p in pairs], S))  # grad_B S
        # one call for the whole model: a stacked product per tensor shape (one in-place foreach
        # product for the scalar variant)
        _apply_many(on_a, on_b, gate)

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

        Two phases: every group's transform and everything it will touch are gathered (and the
        state checked) first, then written. A transport that cannot move some state raises before
        any factor changes, never leaving a half-refactored model. Every pair's grads are read
        before ``opt.state`` is: under ``torch.compile`` a parameter first reached as a key of
        ``opt.state`` has its ``.grad`` guarded by identity, and ``zero_grad(set_to_none=True)``
        frees that tensor every step, which would invalidate the compiled graph.
        """
        jobs = [[self.pairs[i] for i in self._members(group)] for group in self._groups]
        jobs = [pairs for pairs in jobs if pairs]
        plans, unfolded = [], []
        for pairs, (left, right) in zip(jobs, self._metrics(jobs, transform=True)):
            # A' = P^T A = left A, B' = B P^{-T} = B right; gradients and first moments are
            # covectors: P^{-1} g_A = right^T g_A, g_B P = g_B left^T (the scalar variant: p, 1/p)
            on_a = [([p.a() for p in pairs], left), ([p.grad_a() for p in pairs], right.mT)]
            on_b = [([p.b() for p in pairs], right), ([p.grad_b() for p in pairs], left.mT)]
            folded = self._state_chunks(pairs, left, right, on_a, on_b)
            plans.append((pairs, left, right, on_a, on_b, folded))
            if not folded:
                unfolded.extend(pairs)
        if unfolded:
            self._check_state(unfolded)
        # every group's factors, gradients and folded state in one call (see _apply_many)
        _apply_many([c for plan in plans for c in plan[3]], [c for plan in plans for c in plan[4]], gate)
        for pairs, left, right, _, _, folded in plans:
            if not folded:
                # the state moves in float32 (or wider), like the factors and gradients
                T = Transform(_apply_dtype(left, pairs[0].A), _apply_dtype(right, pairs[0].A))
                self._transport_state(pairs, T, None if gate is None else gate.to(pairs[0].A.device))

    def _state_chunks(
        self, pairs: list[LoRAPair], left: Tensor, right: Tensor,
        on_a: list[tuple[list[Tensor], Tensor]], on_b: list[tuple[list[Tensor], Tensor]],
    ) -> bool:
        """Add the optimizer state of ``pairs`` to the factors' products where a spec transport
        maps it element-wise-free: ``"first"`` state like the gradients, ``"second"`` state by
        the ``"square"`` rule (``(P^{-1})^{o2} v_A``, ``v_B P^{o2}``) or not at all (``"keep"``).
        Returns False (nothing added) for anything else, which :meth:`_transport_state` moves:
        function transports, the ``"reset"`` rule, pairs with and without state in one group,
        state that is not parameter-shaped (and so raises there)."""
        spec = getattr(self._transport, "spec", None)
        if spec is None or self.second_moment == "reset":
            return False
        opt = self.optimizer
        states = [(opt.state.get(p.A), opt.state.get(p.B)) for p in pairs]
        if not any(sa or sb for sa, sb in states):
            return True  # no state yet (the first step): nothing to move
        if not all(sa and sb for sa, sb in states):
            return False
        for key in states[0][0]:
            kind = spec.get(key)
            if kind == "keep" or (kind == "second" and self.second_moment == "keep"):
                continue
            if kind not in ("first", "second"):
                return False
            va, vb = [], []
            for p, (sa, sb) in zip(pairs, states):
                a, b = sa.get(key), sb.get(key)
                if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == p.A.shape and b.shape == p.B.shape):
                    return False
                # (distributed hook: a DTensor state is moved through its local shard)
                va.append(to_core(local(a), p.layout[0], p.experts))
                vb.append(to_core(local(b), p.layout[1], p.experts))
            ta, tb = right.mT, left.mT
            if kind == "second":
                ta, tb = ta.square(), tb.square()
            on_a.append((va, ta))
            on_b.append((vb, tb))
        return True

    def _check_state(self, pairs: Iterable[LoRAPair]) -> None:
        """Raise (before anything is modified) if the transport cannot move these pairs' state."""
        _check_transportable(self.optimizer, self._transport, self.second_moment, pairs)

    def _transport_state(self, pairs: list[LoRAPair], T: Transform, gate: Tensor | None = None) -> None:
        opt = self.optimizer
        with_state = [k for k, p in enumerate(pairs) if opt.state.get(p.A) and opt.state.get(p.B)]
        if not with_state:
            return
        assert self._transport is not None
        layA, layB = pairs[0].layout
        experts = pairs[0].experts
        if len(with_state) == len(pairs):  # the usual case: no index tensor, no host-to-device copy
            T_sel = T
        else:
            sel = torch.tensor(with_state, device=T.left.device)
            T_sel = Transform(T.left.index_select(0, sel), T.right.index_select(0, sel))
        chosen = [pairs[k] for k in with_state]
        # A spec transport gets exactly its "first" / "second" keys (_check_state has made sure
        # they are parameter-shaped); a function transport gets every state tensor with at least
        # one dimension, factored ones included. Scalar state (0-d, numbers) stays as it is.
        spec = getattr(self._transport, "spec", None)

        def wanted(key: str, vals: list[Any]) -> bool:
            if spec is not None:
                return spec.get(key) in ("first", "second") and all(isinstance(v, Tensor) for v in vals)
            return all(isinstance(v, Tensor) and v.dim() >= 1 for v in vals)

        def stacked(param_of, view) -> dict[str, Tensor]:
            keys = opt.state[param_of(chosen[0])].keys()
            out = {}
            for key in keys:
                vals = [opt.state[param_of(p)].get(key) for p in chosen]
                if wanted(key, vals):
                    out[key] = torch.stack([view(v) for v in vals])
            return out

        def view_for(layout, param_shape):
            # state shaped like the parameter gets the parameter's view; other shapes (factored
            # states) are left to the transport, which sees the layout in its context
            # (distributed hook: a DTensor state is moved through its local shard)
            return lambda v: to_core(local(v), layout, experts) if v.shape == param_shape else v

        viewA = view_for(layA, chosen[0].A.shape)
        viewB = view_for(layB, chosen[0].B.shape)
        sA = stacked(lambda p: p.A, viewA)
        sB = stacked(lambda p: p.B, viewB)
        ctx = TransportContext(opt, self.second_moment, (layA, layB))
        newA, newB = self._transport(T_sel, sA, sB, ctx)
        for new, param_of, view in ((newA, lambda p: p.A, viewA), (newB, lambda p: p.B, viewB)):
            for key, value in new.items():
                dst = [view(opt.state[param_of(p)][key]) for p in chosen]
                _copy_gated(dst, list(value.unbind(0)), gate)

    def _finish_diagnostics(self, t: int) -> None:
        """Store this step's diagnostics: the stats computed from the kernel's Grams where it ran,
        fresh Grams for the other pairs (the scalar variant, cached or warmup steps, no grads)."""
        parts = self._diag_parts or []
        seen = {id(p) for pairs, _ in parts for p in pairs}
        rest = [[self.pairs[i] for i in g if id(self.pairs[i]) not in seen] for g in self._groups]
        rest = [pairs for pairs in rest if pairs]
        parts += list(zip(rest, _group_stats(rest, self.variant, self.eps)))
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
        registered = _ATTACHED.get(self.optimizer)
        if registered is not None:
            for p in self.pairs:
                for t in (p.A, p.B):
                    if registered.get(id(t)) is self:
                        del registered[id(t)]
        self._removed = True

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
            "pair_names": [canonical_name(p.name) for p in self.pairs],
            "cache": cache,
            "cached": cached,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the configuration must match this handle's."""
        if not isinstance(state, dict) or "step_count" not in state:
            raise TypeError("state must be a dict returned by RefLoRAHandle.state_dict()")
        for key in ("variant", "space", "warmup_steps", "interval"):
            if state[key] != getattr(self, key):
                # space="auto" became the default in place of "gradient": name the fix
                hint = (f" (space={state[key]!r} explicitly; the default space='auto' picks by optimizer, "
                        "see reflora.default_space)" if key == "space" else "")
                raise ValueError(
                    f"checkpoint was saved with {key}={state[key]!r} but this handle has "
                    f"{key}={getattr(self, key)!r}; attach with the same settings to resume{hint}"
                )
        # both sides normalised: checkpoints written before names were canonical may still carry
        # wrapper prefixes (`module.`, `_orig_mod.`, ...)
        names = [canonical_name(p.name) for p in self.pairs]
        saved = [canonical_name(n) for n in state["pair_names"]]
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
        valid_names = {canonical_name(n) for n in state.get("cached", state["cache"])}
        for name, (S, S_inv) in state["cache"].items():
            if canonical_name(name) not in valid_names:
                continue
            if self._bufs is None:
                raise ValueError("checkpoint holds cached metrics but this handle caches none (interval=1)")
            i = index[canonical_name(name)]
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


def _attach_zero(zero: tuple[Any, torch.optim.Optimizer], pairs: list[LoRAPair], **kw: Any) -> RefLoRAHandle:
    wrapper, inner = zero
    check_zero(wrapper, pairs, kw["space"])
    registered = _ATTACHED.setdefault(inner, {})
    for pair in pairs:
        for t in (pair.A, pair.B):
            other = registered.get(id(t))
            if other is not None and not other._removed:
                raise ValueError(f"pair {pair.name!r} is already managed by {other!r}; call handle.remove() first")
    handle = zero_handle_class()(wrapper, inner, pairs, **kw)
    for pair in pairs:
        registered[id(pair.A)] = registered[id(pair.B)] = handle
    return handle


def attach(
    optimizer: torch.optim.Optimizer,
    pairs: nn.Module | Iterable[tuple[Tensor, Tensor] | LoRAPair],
    *,
    variant: Literal["full", "scalar"] = "full",
    space: Space = "auto",
    warmup_steps: int = 0,
    interval: int = 1,
    eps: float | None = None,
    second_moment: Literal["square", "keep", "reset"] = "square",
    compile: bool = False,
    frame: Literal["paper", "symmetric"] | None = None,
    rank_above_size: Literal["skip", "act"] = "skip",
    solver: Literal["eigh", "newton_schulz"] = "eigh",
    diagnostics_interval: int = 0,
    resolved: float | None = None,
    example_inputs: Any = None,
) -> RefLoRAHandle:
    r"""Make ``optimizer`` a RefLoRA optimizer for ``pairs`` (arXiv 2505.18877).

    Args:
        optimizer: any first-order ``torch.optim.Optimizer`` (closure-only ones such as LBFGS
            are rejected). An accelerate ``AcceleratedOptimizer`` is unwrapped.
        pairs: an ``nn.Module`` (pairs found by :func:`reflora.adapters.find_pairs`) or an
            iterable of ``(A, B)`` parameter tuples (``A`` ``(r, m)``, ``B`` ``(n, r)``) or
            :class:`~reflora.LoRAPair` objects. Every factor must be in the optimizer.
        variant: ``"full"`` (RefLoRA, default: with the default space it beat plain LoRA on
            14/15 seeds under AdamW and 15/15 under SGD with momentum on a regression problem,
            and under AdamW trained faster than plain LoRA on all three ``reflora bench --full``
            tasks, 14/15 seeds; README "Defaults (measured)") or ``"scalar"`` (RefLoRA-S:
            cheaper; 14/15 under SGD with momentum in gradient space, 0/15 in parameter space;
            under AdamW on the bench tasks no better than plain LoRA).
        space: ``"auto"`` (default: :func:`default_space`, i.e. ``"parameter"`` for Adam-like
            optimizers, whose element-wise second moments undo most of a gradient-space
            preconditioner, and ``"gradient"`` for SGD-like and unregistered optimizers, under
            DeepSpeed ZeRO and where the pairs rule parameter space out; ``handle.space`` reports
            the choice), ``"gradient"`` (precondition gradients; any optimizer) or ``"parameter"``
            (refactor the factors and transport the optimizer state; needs a registered
            transport, see :func:`reflora.transport.register_state_transport`).
        warmup_steps: optimizer steps before RefLoRA starts (not needed for ``B = 0`` inits).
        interval: act every ``interval`` optimizer steps.
        eps: dead-direction threshold of the core (``None``: 1.4e-14, see
            :func:`reflora.functional.refactor_transform`).
        second_moment: rule for element-wise second moments in parameter space
            (``"square"``: exact for the scalar variant; ``"keep"``; ``"reset"``).
        compile: in eager steps, run the per-group r x r kernel through
            ``torch.compile(fullgraph=True)``: one compiled kernel per shape key, group sizes
            padded to powers of two (any number of distinct ranks, member sets that vary from
            step to step); a key needing more than 6 graphs runs eagerly, with one warning.
            Independent of this flag, the hooks work inside a compiled ``opt.step()`` or train
            step: no recompile after warm-up, no graph break in reflora (see the README,
            "Compiled steps"); there the kernel runs every step, warmup included.
        frame: parameter space only: which refactor ``P`` with ``P P^T = S`` is applied:
            ``"paper"`` (the paper's closed form, balanced Grams ``diag(sigma)``, with a
            canonical sign and tie rule so that factors are reproducible across devices,
            compilation and ranks) or ``"symmetric"`` (``S^{1/2}``, closest to the identity;
            measured to help far less under AdamW). ``None`` (default): ``"paper"`` with
            ``solver="eigh"``, ``"symmetric"`` with ``solver="newton_schulz"`` (``"paper"`` with
            it raises). Gradient space depends on ``S`` only.
        rank_above_size: pairs whose rank exceeds the layer's size (``r > min(m, n)``: a 3-label
            head, an MoE router) have at least ``r - min(m, n)`` directions that ``B A`` can never
            use. ``"skip"`` (default) leaves them to the bare optimizer, with one warning naming
            them; ``"act"`` applies RefLoRA to their live directions (stable, but measured to
            train worse than plain LoRA under AdamW in gradient space; see the README).
        solver: full variant: how the ``r x r`` kernel is computed. ``"eigh"`` (default:
            eigendecompositions, exact dead directions) or ``"newton_schulz"`` (matrix products
            only, a fixed step count: no eigensolver, which is slow for small batched matrices
            on GPUs; symmetric frame only; dead directions regularised, see
            :func:`reflora.functional.refactor_transform`). Ignored by ``variant="scalar"``.
        diagnostics_interval: every this many optimizer steps (``0``: never), record each pair's
            imbalance, Gram condition numbers, distance of ``S`` from the identity and extreme
            singular values of ``B A``, from the Grams the step computes anyway; read them with
            :meth:`RefLoRAHandle.diagnostics` (see :mod:`reflora.diagnostics`). Eager steps
            only (compiled steps record none); under DeepSpeed ZeRO it raises (use
            :func:`reflora.diagnostics.diagnose`).
        resolved: full variant: act on a pair only at steps where its product's singular values
            are resolved, ``sigma_min(B A) >= resolved * sigma_max(B A)``; a pair that fails is
            left to the bare optimizer for that step (``S = I``). ``None`` (default): ``0.1``
            with ``solver="eigh"``, ``0.0`` with ``"newton_schulz"`` (which computes no singular
            values; ``> 0`` with it raises). ``0.0`` acts on every pair at every step, as the
            paper does. Why the gate exists: an adapter whose rank exceeds the rank its task
            needs has directions far below the largest, and balancing those makes RefLoRA train
            slower than plain LoRA (``docs/rank-deficient.md``). Must be ``None`` or ``0`` for
            ``variant="scalar"``, which has no spectrum.
        example_inputs: with ``pairs`` an ``nn.Module``: what the model is called with (a
            tensor, a tuple of positional arguments or a dict of keyword arguments). Pairs no
            finder recognises are then found from one forward pass and verified
            (``find_pairs(model, example_inputs=...)``, see ``docs/finding-pairs.md``); once,
            here, nothing per step.

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
    zero = zero_optimizer(optimizer)  # DeepSpeed: see below
    if zero is not None:
        check_zero_stage(zero[0])  # ZeRO-3 first: its factors are empty placeholders
    variant = check_variant(variant)
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}; got {space!r}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    interval = _check_int("interval", interval, 1)
    diagnostics_interval = _check_int("diagnostics_interval", diagnostics_interval, 0)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool; got {type(compile).__name__}")
    if second_moment not in SECOND_MOMENT_RULES:
        raise ValueError(f"second_moment must be one of {SECOND_MOMENT_RULES}; got {second_moment!r}")
    solver, frame = check_solver(solver, frame)
    resolved = resolve_resolved(resolved, variant, solver)
    if rank_above_size not in ("skip", "act"):
        raise ValueError(f"rank_above_size must be 'skip' or 'act'; got {rank_above_size!r}")
    pair_list = _skip_rank_above_size(_as_pairs(pairs, example_inputs), rank_above_size)
    # distributed hook: DTensor (FSDP2) factors get local views and known reductions; placements
    # this variant cannot use raise here (reflora.distributed)
    pair_list = localize(pair_list, variant)
    if space == "auto":
        space = _resolve_auto(opt, zero, pair_list, variant, solver, second_moment)
    if solver == "newton_schulz" and variant == "full" and space == "parameter":
        above = [p for p in pair_list if p.shape[0] > min(p.shape[1], p.shape[2])]
        if above:
            # the eigh-free solver cannot tell dead directions from live ones; on a direction
            # dead in one factor its P is conditioned like 1e3-1e6, and refactoring by it every
            # step sent the factors to NaN in every case measured
            raise ValueError(
                f"solver='newton_schulz' with space='parameter' cannot refactor pairs whose rank exceeds "
                f"the layer's size (r > min(m, n)), e.g. {above[0].name!r} (r={above[0].shape[0]}, "
                f"m={above[0].shape[1]}, n={above[0].shape[2]}): it has no dead-direction handling and the "
                "refactor becomes ill-conditioned (measured: NaN). Use solver='eigh', space='gradient', or "
                "rank_above_size='skip' (the default, which leaves such pairs to the bare optimizer)"
            )
    if eps is not None:
        check_eps(eps, pair_list[0].A.dtype)

    if zero is not None:
        # DeepSpeed ZeRO steps on flat partitions: gradient space through tensor hooks on the
        # factors (reflora.integrations.deepspeed); what it cannot do raises here
        if diagnostics_interval:
            raise ValueError(
                "diagnostics_interval under DeepSpeed ZeRO: the handle there preconditions gradients in "
                "DeepSpeed's own hooks and records no diagnostics. Leave diagnostics_interval=0 and call "
                "reflora.diagnostics.diagnose(pairs) (or the model) between steps for the same stats"
            )
        return _attach_zero(zero, pair_list, variant=variant, space=space, warmup_steps=warmup_steps,
                            interval=interval, eps=eps, second_moment=second_moment, compile=compile,
                            frame=frame, solver=solver, resolved=resolved)

    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    seen: dict[int, str] = {}
    for pair in pair_list:
        for label, t in (("A", pair.A), ("B", pair.B)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"pair {pair.name!r}: {label} has dtype {t.dtype}; expected a floating dtype")
            if not t.requires_grad:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is frozen "
                    "(requires_grad=False). RefLoRA re-balances two trained factors; with one frozen "
                    "(LoRA-FA, or a partly frozen adapter) there is nothing to re-balance, and the pair "
                    "would be skipped at every step. Train both factors, or leave this pair out of the "
                    "pairs given to attach"
                )
            if id(t) not in in_opt:
                hint = (
                    " (under DeepSpeed, pass engine.optimizer, DeepSpeed's wrapper: the torch optimizer "
                    "inside steps on flat partitions)" if "deepspeed" in sys.modules else ""
                )
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not a parameter "
                    f"of this {_qualname(opt)}; build the optimizer over the LoRA parameters first{hint}"
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
    if space == "parameter" and any_sharded(pair_list):
        transport = get_state_transport(opt)
        if transport is not None and getattr(transport, "spec", None) is None:
            raise UnsupportedOptimizerError(
                f"space='parameter' on sharded (DTensor / FSDP2) factors moves optimizer state shard by shard, "
                f"which needs state shaped like its parameter; {_qualname(opt)}'s transport is a function "
                "(factored state, e.g. Adafactor). Use space='gradient', or an optimizer with parameter-shaped "
                "state (SGD, Adam, AdamW, ...)"
            )
    if space == "parameter" and get_state_transport(opt) is None:
        raise UnsupportedOptimizerError(
            f"space='parameter' must move {_qualname(opt)}'s state with the factors, and no "
            f"transport is registered for it (registered: {registered_optimizers()}). Declare its "
            f"state with reflora.transport.register_state_transport({type(opt).__name__}, "
            "{'state_key': 'first' | 'second' | 'keep', ...}) (kinds apply to parameter-shaped "
            "state; factored state needs a function transport), or use space='gradient', which "
            "works with any optimizer."
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
        frame=frame,
        solver=solver,
        diagnostics_interval=diagnostics_interval,
        resolved=resolved,
    )
    if space == "parameter":
        try:  # state the transport cannot move is an error now, not at some later step
            handle._check_state(pair_list)
        except Exception:
            handle.remove()
            raise
        if second_moment == "reset" and _keeps_second_moments(get_state_transport(opt)):
            warnings.warn(
                f"second_moment='reset' zeroes {_qualname(opt)}'s second moments at every refactor, so the next "
                "update divides by a near-zero denominator: with the full variant it diverged in every AdamW cell "
                "of benchmarks/rank_deficient.py (90 of 90; docs/rank-deficient.md). Use second_moment='square' "
                "(the default)",
                UnstableOptionWarning,
                stacklevel=2,
            )
    for pair in pair_list:
        registered[id(pair.A)] = handle
        registered[id(pair.B)] = handle
    return handle
