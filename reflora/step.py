r"""The RefLoRA step, written once, over lists of pairs and tensors (arXiv 2505.18877).

Per same-shape group of pairs: the Grams (O((m + n) r^2), float64) or squared norms, one batched
r x r kernel (:func:`reflora._kernels.group_kernel`), then the r x r results applied to the
factors, the gradients and each kind of optimizer state (:data:`reflora.transport.STATE_KINDS`)
in float32 or wider and written back with ``copy_``. Front-ends only gather and scatter:

* the optimizer hook (:class:`reflora.handle.RefLoRAHandle`) calls :func:`metrics`, then
  :func:`precondition` (gradient space) or :func:`refactor` (parameter space);
* the DeepSpeed ZeRO strategy (:mod:`reflora.integrations.deepspeed`) calls :func:`metrics` and
  :func:`precondition_one` from gradient hooks;
* :mod:`reflora.func` calls :func:`kernel_of_stack` and :func:`transformed`, the gated,
  out-of-place form.

A traced step (inside ``torch.compile``) passes ``gate``, a 0-d bool: every update is computed
and the old value kept where the gate is false (:func:`copy_gated`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import Tensor

from reflora._kernels import grams, group_kernel, metric, metric_kernel, full_kernel, scalar_kernel
from reflora._linalg import compute_dtype, mm
from reflora.distributed import group_key, local, reduce_grams, reduce_sq_norms
from reflora.functional import Transform, apply_transform, map_first_moments
from reflora.pairs import LoRAPair, to_core
from reflora.transport import STATE_KINDS, TransportContext, check_transportable

if TYPE_CHECKING:
    from reflora.config import RefLoRAConfig

__all__ = [
    "apply_dtype",
    "apply_many",
    "copy_gated",
    "gram_stack",
    "group_pairs",
    "kernel_of_stack",
    "metrics",
    "precondition",
    "precondition_one",
    "refactor",
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
    """Indices of ``pairs`` grouped by ``(device, dtype, experts, r, m, n, layout, sharding)``:
    each group is computed by one batched call."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[(p.A.device, p.A.dtype, p.experts, *p.shape, p.layout, group_key(p))].append(i)
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


def group_stats(pairs: list[LoRAPair], variant: str) -> tuple[Tensor, Tensor]:
    """What the kernel of ``variant`` needs: the Grams (full) or the squared norms (scalar),
    summed over the ranks for sharded pairs."""
    if variant == "scalar":
        # distributed hook: sharded factors give partial norms, summed by one collective per group
        return reduce_sq_norms(pairs, sq_norms([p.a() for p in pairs]), sq_norms([p.b() for p in pairs]))
    return gram_stack(pairs)


# ------------------------------------------------------------------------------- kernel


def metrics(
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
    stats = [group_stats(pairs, cfg.variant) for pairs in jobs]
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


def precondition(jobs: list[list[LoRAPair]], metrics_: list[tuple[Tensor, Tensor]], gate: Tensor | None = None) -> None:
    """``grad_A <- S^{-1} grad_A``, ``grad_B <- grad_B S`` for every group of ``jobs`` with its
    ``(S, S^{-1})``: one call for the whole model (a stacked product per tensor shape, one
    in-place foreach product for the scalar variant)."""
    on_a = [([p.grad_a() for p in pairs], S_inv) for pairs, (_, S_inv) in zip(jobs, metrics_)]
    on_b = [([p.grad_b() for p in pairs], S) for pairs, (S, _) in zip(jobs, metrics_)]
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


class StateMover:
    """What a refactor needs of the optimizer: its state and its transport. ``spec`` is the
    transport's ``{state key: kind}`` (``None``: a function transport); ``rule`` below is the
    second-moment rule (``"square"``, ``"keep"``, ``"reset"``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, transport: Any) -> None:
        self.optimizer = optimizer
        self.transport = transport
        self.spec = getattr(transport, "spec", None)

    def check(self, pairs: Iterable[LoRAPair], rule: str) -> None:
        """Raise (before anything is modified) if the transport cannot move these pairs' state."""
        check_transportable(self.optimizer, self.transport, rule, pairs)

    def fold(self, pairs: list[LoRAPair], left: Tensor, right: Tensor, on_a: Chunks, on_b: Chunks, rule: str) -> bool:
        """Add the optimizer state of ``pairs`` to the factors' products where its kind maps it
        by a product (:data:`reflora.transport.STATE_KINDS`): ``"first"`` state like the
        gradients, ``"second"`` state by the ``"square"`` rule or not at all (``"keep"``).
        Returns False (nothing added) for anything else, which :meth:`move` handles: function
        transports, the ``"reset"`` rule, pairs with and without state in one group, state that
        is not parameter-shaped (and so raises there)."""
        spec = self.spec
        if spec is None or rule == "reset":
            return False
        opt = self.optimizer
        states = [(opt.state.get(p.A), opt.state.get(p.B)) for p in pairs]
        if not any(sa or sb for sa, sb in states):
            return True  # no state yet (the first step): nothing to move
        if not all(sa and sb for sa, sb in states):
            return False
        for key in states[0][0]:
            kind = STATE_KINDS.get(spec.get(key))  # type: ignore[arg-type]
            if kind is None:
                return False
            prod = kind.product(left, right, rule)
            if prod is None:
                continue
            if prod is NotImplemented:
                return False
            va, vb = [], []
            for p, (sa, sb) in zip(pairs, states):
                a, b = sa.get(key), sb.get(key)
                if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == p.A.shape and b.shape == p.B.shape):
                    return False
                # (distributed hook: a DTensor state is moved through its local shard)
                va.append(to_core(local(a), p.layout[0], p.experts))
                vb.append(to_core(local(b), p.layout[1], p.experts))
            on_a.append((va, prod[0]))
            on_b.append((vb, prod[1]))
        return True

    def move(self, pairs: list[LoRAPair], T: Transform, rule: str, gate: Tensor | None = None) -> None:
        """Move the state of ``pairs`` through the transport (stacked per key), in place."""
        opt = self.optimizer
        with_state = [k for k, p in enumerate(pairs) if opt.state.get(p.A) and opt.state.get(p.B)]
        if not with_state:
            return
        assert self.transport is not None
        layA, layB = pairs[0].layout
        experts = pairs[0].experts
        if len(with_state) == len(pairs):  # the usual case: no index tensor, no host-to-device copy
            T_sel = T
        else:
            sel = torch.tensor(with_state, device=T.left.device)
            T_sel = Transform(T.left.index_select(0, sel), T.right.index_select(0, sel))
        chosen = [pairs[k] for k in with_state]
        move_state = getattr(self.transport, "move_state", None)
        if move_state is not None:  # quantized state (reflora.lowbit): the transport reads and writes it
            move_state(opt, chosen, T_sel, rule, gate)
            return
        # A spec transport gets exactly its "first" / "second" keys (check has made sure they are
        # parameter-shaped); a function transport gets every state tensor with at least one
        # dimension, factored ones included. Scalar state (0-d, numbers) stays as it is.
        spec = self.spec

        def wanted(key: str, vals: list[Any]) -> bool:
            if spec is not None:
                return spec.get(key) in ("first", "second") and all(isinstance(v, Tensor) for v in vals)
            return all(isinstance(v, Tensor) and v.dim() >= 1 for v in vals)

        def stacked(param_of, view) -> dict[str, Tensor]:
            out = {}
            for key in opt.state[param_of(chosen[0])].keys():
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
        ctx = TransportContext(opt, rule, (layA, layB))
        newA, newB = self.transport(T_sel, sA, sB, ctx)
        for new, param_of, view in ((newA, lambda p: p.A, viewA), (newB, lambda p: p.B, viewB)):
            for key, value in new.items():
                dst = [view(opt.state[param_of(p)][key]) for p in chosen]
                copy_gated(dst, list(value.unbind(0)), gate)


def refactor(
    jobs: list[list[LoRAPair]], transforms: list[tuple[Tensor, ...]], mover: StateMover, rule: str,
    gate: Tensor | None = None,
) -> None:
    """Refactor every group of ``jobs`` by its ``(left, right) = (P^T, P^{-T})``: factors,
    gradients and optimizer state (second moments by ``rule``).

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
        folded = mover.fold(pairs, left, right, on_a, on_b, rule)
        plans.append((pairs, left, right, on_a, on_b, folded))
        if not folded:
            unfolded.extend(pairs)
    if unfolded:
        mover.check(unfolded, rule)
    # every group's factors, gradients and folded state in one call (see apply_many)
    apply_many([c for plan in plans for c in plan[3]], [c for plan in plans for c in plan[4]], gate)
    for pairs, left, right, _, _, folded in plans:
        if not folded:
            # the state moves in float32 (or wider), like the factors and gradients
            T = Transform(apply_dtype(left, pairs[0].A), apply_dtype(right, pairs[0].A))
            mover.move(pairs, T, rule, None if gate is None else gate.to(pairs[0].A.device))
