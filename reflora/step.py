r"""The RefLoRA step, written once, over lists of pairs and tensors (arXiv 2505.18877).

Per same-shape group of pairs: the Grams (O((m + n) r^2), float64) or squared norms, one batched
r x r kernel (``reflora._kernels.group_kernel``), then the r x r results applied to the
factors, the gradients and each kind of optimizer state (:data:`reflora.transport.STATE_KINDS`)
in float32 or wider and written back with ``copy_``. Front-ends only gather and scatter:

* the optimizer hook (:class:`reflora.runner.StepRunner`, for :class:`reflora.RefLoRAHandle`)
  calls :func:`group_metrics`, then :func:`precondition_groups` (gradient space) or
  :func:`refactor_groups` (parameter space, the state through its
  :class:`~reflora.transport.StateTransport`);
* the DeepSpeed ZeRO strategy (:class:`reflora.strategies.ZeroGradientStrategy`) calls
  :func:`group_metrics` (through the handle's :class:`~reflora.cache.MetricCache`) and
  :func:`precondition_one` from gradient hooks;
* :mod:`reflora.func` calls :func:`kernel_of_stack` and :func:`transformed`, the gated,
  out-of-place form.

A traced step (inside ``torch.compile``) passes ``gate``, a 0-d bool: every update is computed
and the old value kept where the gate is false (:func:`copy_gated`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from reflora._kernels import full_kernel, grams, group_kernel, metric, metric_kernel, scalar_kernel
from reflora._linalg import compute_dtype, mm
from reflora.config import RefLoRAConfig
from reflora.distributed import group_key, reduce_grams, reduce_sq_norms
from reflora.functional import Transform, apply_transform, map_first_moments
from reflora.pairs import LoRAPair, batch_key, to_core
from reflora.transport import STATE_KINDS, StateTransport

__all__ = [
    "apply_dtype",
    "apply_many",
    "copy_gated",
    "gram_stack",
    "group_metrics",
    "group_pairs",
    "kernel_inputs",
    "kernel_of_stack",
    "precondition_groups",
    "precondition_one",
    "refactor_groups",
    "sq_norms",
    "transformed",
]

Chunks = list[tuple[list[Tensor], Tensor]]

# Above this many elements per factor the big ops are bandwidth-bound: stacking would add a copy
# of every factor for nothing, so they run per pair in place; below it they are launch-bound and
# one batched matmul over the stacked group is faster (benchmarks/overhead.py).
STACK_MAX_NUMEL = 1 << 16
# Stacks of smaller tensors (the Grams' and the products') are made in chunks of at most this
# many elements (512 KB of float32): a chunk's stacked copy, its product and the copy back stay in
# cache and in memory the allocator keeps, so a factor crosses memory about once instead of three
# times, and no multi-MB temporary is mapped afresh each step (benchmarks/overhead.py, sections a
# and b); a small model's few tensors still take one product.
CHUNK_NUMEL = 1 << 17
# The same for the scalar variant's norms, whose reduction is cheaper than a copy sooner
# (docs/design.md, "Thresholds").
NORM_STACK_MAX_NUMEL = 1 << 12


# ------------------------------------------------------------------------------- grouping


def group_pairs(pairs: Iterable[LoRAPair]) -> list[list[int]]:
    """Indices of ``pairs`` grouped by :func:`reflora.pairs.batch_key` (device, dtype, experts,
    ``(r, m, n)``, layouts, sharding): each group is computed by one batched call."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[batch_key(p.A.device, p.A.dtype, p.experts, p.shape, p.layout, group_key(p))].append(i)
    return list(groups.values())


# ------------------------------------------------------------------------------- Grams


def gram_stack(pairs: list[LoRAPair]) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)`` of a group, stacked, in the compute dtype.

    Sharded factors (FSDP2 ``DTensor`` s) give this rank's partial Grams, summed over the ranks
    by one collective (:func:`reflora.distributed.reduce_grams`).
    """
    if pairs[0].A.numel() > STACK_MAX_NUMEL:
        Xs, Ys = zip(*(grams(p.a(), p.b()) for p in pairs))
        X, Y = torch.stack(Xs), torch.stack(Ys)
    else:
        k = max(1, CHUNK_NUMEL // pairs[0].A.numel())  # cache-sized stacks (see CHUNK_NUMEL)
        parts = [_stacked_grams(pairs[i:i + k]) for i in range(0, len(pairs), k)]
        X, Y = parts[0] if len(parts) == 1 else (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    return reduce_grams(pairs, X, Y)  # distributed hook: a no-op for unsharded pairs


def _stacked_grams(pairs: list[LoRAPair]) -> tuple[Tensor, Tensor]:
    a0, b0 = pairs[0].a(), pairs[0].b()
    if a0.shape == b0.mT.shape and a0.dtype == b0.dtype and b0.mT.is_contiguous():
        # square layer (m == n) whose B is stored transposed: A and B^T stack (plain copies) into
        # one (2G, r, m) product, Y = (B^T)(B^T)^T
        Z = torch.stack([p.a() for p in pairs] + [p.b().mT for p in pairs]).to(compute_dtype(a0.dtype))
        XY = mm(Z, Z.mT)
        return XY[: len(pairs)], XY[len(pairs):]
    return grams(torch.stack([p.a() for p in pairs]), torch.stack([p.b() for p in pairs]))


def sq_norms(tensors: list[Tensor]) -> Tensor:
    """Squared Frobenius norms of core views: ``(G,)`` for 2-D factors, ``(G, E)`` per expert."""
    cd = compute_dtype(tensors[0].dtype)
    if tensors[0].numel() <= NORM_STACK_MAX_NUMEL:  # launch-bound: one stacked reduction
        # (per expert for (E, ., .) views: a norm over the whole stack would give every expert the same scale)
        return torch.linalg.vector_norm(torch.stack(tensors), dim=(-2, -1), dtype=cd).square()
    if tensors[0].dim() == 2:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=cd)).square()
    return torch.stack([torch.linalg.vector_norm(t, dim=(-2, -1), dtype=cd) for t in tensors]).square()


def kernel_inputs(pairs: list[LoRAPair], variant: str) -> tuple[Tensor, Tensor]:
    """What the kernel of ``variant`` needs: the Grams (full) or the squared norms (scalar),
    summed over the ranks for sharded pairs."""
    if variant == "scalar":
        # distributed hook: sharded factors give partial norms, summed by one collective per group
        return reduce_sq_norms(pairs, sq_norms([p.a() for p in pairs]), sq_norms([p.b() for p in pairs]))
    return gram_stack(pairs)


# ------------------------------------------------------------------------------- kernel


def group_metrics(
    jobs: list[list[LoRAPair]], cfg: RefLoRAConfig, transform: bool,
    on_grams: Callable[[list[LoRAPair], Tensor, Tensor], None] | None = None,
) -> list[tuple[Tensor, ...]]:
    """Per group of ``jobs``: ``(left, right)`` if ``transform`` else ``(S, S^{-1})``,
    ``(G, r, r)`` (``(G, 1, 1)`` for the scalar variant; experts add a dimension, ``(G, E, ., .)``).

    The kernel depends on the Grams only, so groups whose Grams have the same shape (same
    rank, different layer sizes) share one batched kernel call: a model with several layer
    shapes pays the kernel's fixed cost once per rank, not once per shape. ``on_grams(pairs, X,
    Y)`` sees each group's Grams (the full variant; diagnostics reuse them).
    """
    stats = [kernel_inputs(pairs, cfg.variant) for pairs in jobs]
    if on_grams is not None and cfg.variant == "full":
        for pairs, (X, Y) in zip(jobs, stats):
            on_grams(pairs, X, Y)
    batches: dict[tuple, list[int]] = defaultdict(list)
    for k, (X, _) in enumerate(stats):
        batches[(X.device, X.shape[1:])].append(k)
    out: list[tuple[Tensor, ...]] = [()] * len(jobs)
    for ks in batches.values():
        X = stats[ks[0]][0] if len(ks) == 1 else torch.cat([stats[k][0] for k in ks])
        Y = stats[ks[0]][1] if len(ks) == 1 else torch.cat([stats[k][1] for k in ks])
        if cfg.variant == "scalar":
            left, right = scalar_kernel(X, Y)
            res: tuple[Tensor, ...] = (left, right) if transform else metric(left, right)
        else:
            res = group_kernel(
                X, Y, eps=cfg.eps_for(X.dtype), frame=cfg.frame, solver=cfg.solver,  # type: ignore[arg-type]
                resolved=cfg.resolved, transform=transform, compiled=cfg.compile,  # type: ignore[arg-type]
            )
        if len(ks) == 1:
            out[ks[0]] = res
            continue
        parts = [t.split([stats[k][0].shape[0] for k in ks]) for t in res]
        for j, k in enumerate(ks):
            out[k] = tuple(part[j] for part in parts)
    return out


def kernel_of_stack(A: Tensor, B: Tensor, cfg: RefLoRAConfig, eps: float) -> tuple[Tensor, Tensor]:
    """The traceable kernel on stacked core-layout factors ``(G, [E,] r, m)``, ``(G, [E,] n, r)``
    (:mod:`reflora.func`): ``(S, S^{-1})`` in gradient space, ``(left, right)`` in parameter
    space; always the general kernel (no host sync)."""
    if cfg.variant == "scalar":
        cd = compute_dtype(A.dtype)
        left, right = scalar_kernel(A.to(cd).square().sum((-2, -1)), B.to(cd).square().sum((-2, -1)))
        return metric(left, right) if cfg.space == "gradient" else (left, right)
    X, Y = grams(A, B)
    if cfg.space == "gradient":
        return metric_kernel(X, Y, eps, cfg.solver, cfg.resolved)  # type: ignore[arg-type]
    return full_kernel(X, Y, eps, cfg.frame, cfg.solver, cfg.resolved)[:2]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- out of place


def transformed(
    T: Transform, grads: tuple[Tensor, Tensor], factors: tuple[Tensor, Tensor] | None = None,
    states: Iterable[tuple[str, tuple[Tensor, Tensor]]] = (), rule: str = "square", gate: Tensor | None = None,
) -> list[tuple[Tensor, Tensor] | None]:
    """One pair's step out of place (:mod:`reflora.func`): the new ``(A-side, B-side)`` of the
    gradients, then, in parameter space (``factors`` given), of the factors and of each
    ``(kind, (state_A, state_B))`` by its kind (:data:`reflora.transport.STATE_KINDS`; ``None``
    where the kind leaves the state as it is). With ``gate`` (a 0-d bool) every output is
    ``where(gate, new, old)``: selecting the output, not gating the transform, leaves a skipped
    step exactly as it was, non-finite values and the ``"reset"`` rule included.

    In gradient space ``T = (S, S^{-1})``, both symmetric: the first-moment map ``right^T g_A``,
    ``g_B left^T`` is then the preconditioning ``S^{-1} g_A``, ``g_B S``.
    """
    work: list[tuple[tuple[Tensor, Tensor], Any]] = [(grads, map_first_moments(T, *grads))]
    if factors is not None:
        work.append((factors, apply_transform(T, *factors)))
        work += [(old, STATE_KINDS[kind].apply(T, *old, rule)) for kind, old in states]
    if gate is None:
        return [None if new is None else tuple(new) for _, new in work]  # type: ignore[misc]
    return [None if new is None else (torch.where(gate, new[0], old[0]), torch.where(gate, new[1], old[1]))
            for old, new in work]


# ------------------------------------------------------------------------------- applying


def copy_gated(xs: list[Tensor], new: list[Tensor] | tuple[Tensor, ...], gate: Tensor | None) -> None:
    """``x_i <- new_i``, or, under a traced step, ``x_i <- where(gate, new_i, x_i)``.

    A compiled step must not branch in Python on the step counter (every step would be a new
    guard value, i.e. a recompile), so it computes every update and keeps the old value where
    the 0-d ``gate`` is false. Selecting the *output* (not scaling the transform to the identity)
    leaves non-finite values and the ``second_moment="reset"`` rule exactly as they were.
    """
    if gate is not None:
        new = [torch.where(gate, n, x) for n, x in zip(new, xs)]
    torch._foreach_copy_(xs, new)


def apply_dtype(T: Tensor, x: Tensor) -> Tensor:
    """``T`` in the dtype the transforms are applied in: float32, or float64 for float64 factors.

    The kernel is float64 for accuracy (the Grams); applying its ``r x r`` result to the big
    factors, gradients and state in float32 costs half as much and changes ``B A`` by about
    ``machine_eps(float32) * cond(P)`` of ``||A|| ||B||`` per refactor (``P`` is near the identity
    once the pair is balanced).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # (factors are floating point)
    return T if T.dtype == dtype else T.to(dtype)


def _scalars_in_place(chunks: Chunks) -> bool:
    """Whether ``chunks`` are scalar transforms, one per tensor (``(G, 1, 1)``), on tensors of one
    device and one dtype that is float32 or wider: then one in-place foreach product does them all."""
    if not all(T.dim() == 3 and T.shape[-1] == 1 for _, T in chunks):
        return False
    xs = [x for chunk, _ in chunks for x in chunk]
    return len({(x.dtype, x.device) for x in xs}) == 1 and xs[0].dtype in (torch.float32, torch.float64)


def apply_many(left: Chunks, right: Chunks = (), gate: Tensor | None = None) -> None:  # type: ignore[assignment]
    """``x <- T[i] @ x`` for every chunk ``(xs, T)`` of ``left`` and ``x <- x @ T[i]`` for every
    chunk of ``right`` (``xs`` of one shape per chunk; a scalar ``T``, ``(G, [E,] 1, 1)``, multiplies).

    Small tensors (launch-bound) go through one stacked product per ``(side, dtype, device,
    shape)`` for everything at once (factors, gradients and optimizer state, every group; a right
    product ``x T`` of a transposed layout is done as ``(T^T x^T)^T`` on the contiguous ``x^T``,
    so that every stack is a plain copy; stacks of at most ``CHUNK_NUMEL`` elements), large ones
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
    buckets: dict[tuple, Chunks] = defaultdict(list)
    for side, xs, T in chunks:
        scalar = T.shape[-1] == 1
        if xs[0].numel() > STACK_MAX_NUMEL:
            for t, x in zip(apply_dtype(T, xs[0]).unbind(0), xs):  # no second copy of the group
                y = x.to(t.dtype)
                new = t * y if scalar else (t @ y if side == "left" else y @ t)
                copy_gated([x], [new], None if gate is None else gate.to(x.device))
            continue
        if side == "right" and not scalar and not xs[0].is_contiguous() and xs[0].mT.is_contiguous():
            # a transposed layout: x T = (T^T x^T)^T on the contiguous x^T (stacking strided views
            # would be a strided copy, several times slower than a plain one)
            side, xs, T = "left", [x.mT for x in xs], T.mT
        buckets[(side if not scalar else "left", xs[0].dtype, xs[0].device, xs[0].shape, scalar)].append((xs, T))
    for (side, dtype, device, _, scalar), group in buckets.items():
        # (no no-op calls here: on a small model every call counts, see benchmarks/overhead.py (c))
        xs = [x for chunk, _ in group for x in chunk]
        T = apply_dtype(torch.cat([T for _, T in group]) if len(group) > 1 else group[0][1], xs[0])
        # stacks of at most CHUNK_NUMEL elements (see there)
        k = max(1, CHUNK_NUMEL // xs[0].numel())
        for i in range(0, len(xs), k):
            sub, Ti = xs[i:i + k], T[i:i + k] if len(xs) > k else T
            X = torch.stack(sub)
            if dtype != Ti.dtype:
                X = X.to(Ti.dtype)
            out = Ti * X if scalar else (mm(Ti, X) if side == "left" else mm(X, Ti))
            copy_gated(sub, out.unbind(0), None if gate is None else gate.to(device))


# ------------------------------------------------------------------------------- gradient space


def precondition_groups(
    jobs: list[list[LoRAPair]], metrics: list[tuple[Tensor, Tensor]], gate: Tensor | None = None
) -> None:
    """``grad_A <- S^{-1} grad_A``, ``grad_B <- grad_B S`` for every group of ``jobs`` with its
    ``(S, S^{-1})``: one call for the whole model (a stacked product per tensor shape, one
    in-place foreach product for the scalar variant)."""
    on_a = [([p.grad_a() for p in pairs], S_inv) for pairs, (_, S_inv) in zip(jobs, metrics)]
    on_b = [([p.grad_b() for p in pairs], S) for pairs, (S, _) in zip(jobs, metrics)]
    apply_many(on_a, on_b, gate)


def precondition_one(grad: Tensor, pair: LoRAPair, role: str, S: Tensor, S_inv: Tensor, scalar: bool) -> Tensor:
    """One stored gradient of ``pair`` (``role`` ``"A"`` or ``"B"``) preconditioned, out of place
    (a gradient hook's return value): ``S^{-1} g_A`` or ``g_B S``."""
    layout = pair.layout[0 if role == "A" else 1]
    g = to_core(grad, layout, pair.experts)
    T = apply_dtype(S_inv if role == "A" else S, g)
    if scalar:
        new = g.to(T.dtype) * T
    else:
        new = T @ g.to(T.dtype) if role == "A" else g.to(T.dtype) @ T
    out = torch.empty_like(grad)
    to_core(out, layout, pair.experts).copy_(new)
    return out


# ------------------------------------------------------------------------------- parameter space


def refactor_groups(
    jobs: list[list[LoRAPair]], transforms: list[tuple[Tensor, ...]], optimizer: torch.optim.Optimizer,
    transport: StateTransport, rule: str, gate: Tensor | None = None,
    followers: Mapping[int, Sequence[LoRAPair]] | None = None,
) -> None:
    """Refactor every group of ``jobs`` by its ``(left, right) = (P^T, P^{-T})``: factors,
    gradients and the optimizer state (through ``transport``; second moments by ``rule``), and
    the pairs that follow a pair (``followers``, by ``id`` of the pair: the copies of an
    averaged model, see :meth:`reflora.RefLoRAHandle.follow`) like the factors, on their own
    device.

    Two phases: every group's transform and everything it will touch are gathered (and the
    state checked) first, then written. A transport that cannot move some state raises before
    any factor changes, never leaving a half-refactored model.
    """
    plans, unfolded = [], []
    for pairs, (left, right) in zip(jobs, transforms):
        # A' = P^T A = left A, B' = B P^{-T} = B right; gradients and first moments are
        # covectors: P^{-1} g_A = right^T g_A, g_B P = g_B left^T (the scalar variant: p, 1/p)
        on_a = [([p.a() for p in pairs], left), ([p.grad_a() for p in pairs], right.mT)]
        on_b = [([p.b() for p in pairs], right), ([p.grad_b() for p in pairs], left.mT)]
        folded = transport.fold(optimizer, pairs, left, right, rule)
        if folded is not None:
            on_a += folded[0]
            on_b += folded[1]
        else:
            unfolded.extend(pairs)
        plans.append((pairs, left, right, on_a, on_b, folded is not None))
    if unfolded:
        transport.check_pairs(optimizer, unfolded, rule)
    # every group's factors, gradients and folded state in one call (see apply_many)
    apply_many([c for plan in plans for c in plan[3]], [c for plan in plans for c in plan[4]], gate)
    if followers:
        # an averaged copy of a factor is a point in parameter space (the "iterate" kind): P^T A_avg,
        # B_avg P^{-T}, so that the average keeps its own product
        on_a, on_b = [], []
        for pairs, left, right, *_ in plans:
            for k, pair in enumerate(pairs):
                for f in followers.get(id(pair), ()):
                    on_a.append(([f.a()], left[k:k + 1].to(f.A.device)))
                    on_b.append(([f.b()], right[k:k + 1].to(f.B.device)))
        apply_many(on_a, on_b, gate)
    for pairs, left, right, _, _, folded in plans:
        if folded:
            continue
        with_state = [k for k, p in enumerate(pairs) if optimizer.state.get(p.A) and optimizer.state.get(p.B)]
        if not with_state:
            continue
        # the state moves in float32 (or wider), like the factors and gradients
        T = Transform(apply_dtype(left, pairs[0].A), apply_dtype(right, pairs[0].A))
        if len(with_state) < len(pairs):  # (the usual case, all of them, needs no index tensor)
            sel = torch.tensor(with_state, device=T.left.device)
            T = Transform(T.left.index_select(0, sel), T.right.index_select(0, sel))
        transport.move(optimizer, [pairs[k] for k in with_state], T, rule,
                       None if gate is None else gate.to(pairs[0].A.device))
