r"""The full variant on factors sharded along their rank dimension: FSDP2's default ``Shard(0)``.

FSDP2 shards every parameter along dimension 0 unless told otherwise, and so do Trainer's
``fsdp_config`` and ``accelerate launch``. That is right for ``B = lora_B.weight`` ``(n, r)`` but
splits the rank dimension ``r`` of ``A = lora_A.weight`` ``(r, m)``: rank ``k`` holds some rows of
``A``, while the full variant of RefLoRA (arXiv 2505.18877) mixes all ``r`` rows, in ``X = A A^T``,
``P^T A``, ``P^{-1} grad_A``, ``S^{-1} grad_A`` and the state maps.

Around the step (inside the optimizer's pre-hook, before the optimizer reads anything), every such
tensor is gathered along the mesh dimension that splits ``r`` (``Shard(0) -> Replicate()``: one
all-gather of all their shards, concatenated, per process group and dtype), the step runs on the
whole copies (a gathered ``A`` adds its Gram to the all-reduce from one rank only, as a replicated
factor does, so the sum counts it once; ``B`` stays sharded along ``n``), and each rank copies its
own rows of what the step changed back into its shard (``Replicate() -> Shard(0)``: a slice, no
communication)::

    A, grad_A (+ A's optimizer state in parameter space)   Shard(0) --one all-gather--> Replicate()
    the step on the whole copies (reflora.step, unchanged)
    grad_A (+ A and its state in parameter space)          Replicate() --own rows--> Shard(0)

What is gathered: in gradient space ``A`` (the Grams) and ``grad_A``; in parameter space ``A``,
``grad_A`` and each optimizer state tensor shaped and sharded like ``A`` (AdamW's ``exp_avg`` /
``exp_avg_sq``, SGD's ``momentum_buffer``). Per rank and step that is ``(W - 1) / W`` of each
tensor's whole size received, and a whole ``r x m`` copy of each held during the hook. The
alternative, a ``Shard(0) -> Shard(1)`` all-to-all there and back, receives ``2 (W - 1) / W^2``:
the same at ``W = 2``, less beyond, but two collectives per tensor, and on gloo (CPU) DTensor
performs it as an all-gather each way. ``docs/fsdp2.md`` has the variants measured.
A ``B`` sharded along its rank dimension (``Shard(1)``) is gathered the same way.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from reflora.distributed import comm_stats, is_dtensor, local
from reflora.pairs import LoRAPair

__all__ = ["moved_roles", "restaged"]


def moved_roles(pair: LoRAPair) -> tuple[str, ...]:
    """The factors of ``pair`` (``"A"``, ``"B"``) the full variant steps on as work copies."""
    s = getattr(pair, "sharding", None)
    if s is None:
        return ()
    return tuple(role for role, work in zip("AB", s.work) if work is not None)


def _redistribute(t: Tensor, placements: tuple) -> Tensor:
    """``t`` (a ``DTensor``) redistributed to ``placements``; a gather is counted in
    :func:`comm_stats` (the payload this rank hands to the collective: its local shard), taking
    one's own shard of a replicated tensor is local and not counted."""
    from torch.distributed.tensor import Shard

    stats = comm_stats()
    start = time.perf_counter()
    out = t.detach().redistribute(t.device_mesh, placements)
    if any(isinstance(src, Shard) and src != dst for src, dst in zip(t.placements, placements)):
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        payload = local(t).numel() * t.element_size()
        stats.bytes += payload
        stats.redistributed += payload
    return out


def _chunk_sizes(size: int, parts: int) -> list[int]:
    """How ``Shard`` splits ``size`` entries over ``parts`` coordinates (``torch.chunk``: equal
    chunks of ``ceil(size / parts)``, the last ones smaller or empty)."""
    c = -(-size // parts) if size else 0
    return [max(0, min(c, size - j * c)) for j in range(parts)]


def _gather_dim(t: Tensor, work: tuple) -> int | None:
    """The one mesh dimension along which ``work`` gathers ``t`` (``Shard -> Replicate``), if the
    batched gather can do it: no other change, and no other mesh dimension sharding the same
    tensor dimension (nested shards). ``None``: left to ``DTensor.redistribute``."""
    from torch.distributed.tensor import Replicate, Shard

    changed = [d for d, (src, dst) in enumerate(zip(t.placements, work)) if src != dst]
    if len(changed) != 1:
        return None
    d = changed[0]
    src = t.placements[d]
    if not (isinstance(src, Shard) and isinstance(work[d], Replicate)):
        return None
    dim = src.dim % t.dim()
    if any(isinstance(q, Shard) and q.dim % t.dim() == dim for e, q in enumerate(t.placements) if e != d):
        return None
    return d


def _gather_all(items: list[tuple[Tensor, tuple]]) -> list[Tensor]:
    """Every ``(DTensor, work placements)`` of ``items`` gathered: one all-gather of the
    concatenated shards per process group and dtype (instead of one per tensor: on a model with
    many pairs the step is latency-bound), the rest through ``DTensor.redistribute``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out: list[Tensor | None] = [None] * len(items)
    batches: dict[tuple, list[int]] = {}
    for i, (t, work) in enumerate(items):
        d = _gather_dim(t, work)
        if d is None:
            out[i] = _redistribute(t, work)
            continue
        group = t.device_mesh.get_group(d)
        batches.setdefault((id(group), t.dtype, t.device, d), []).append(i)
    stats = comm_stats()
    for (_, dtype, device, d), idx in batches.items():
        mesh = items[idx[0]][0].device_mesh
        group, W = mesh.get_group(d), mesh.size(d)
        # per tensor: the sharded dimension, its chunk sizes over the W coordinates, and the
        # local shape around it (other mesh dimensions may shard other tensor dimensions)
        specs = []
        for i in idx:
            t = items[i][0]
            dim = t.placements[d].dim % t.dim()
            shape = list(local(t).shape)
            inner = math.prod(shape) // shape[dim] if shape[dim] else math.prod(shape[:dim] + shape[dim + 1:])
            specs.append((dim, _chunk_sizes(t.shape[dim], W), shape, inner))
        totals = [sum(sizes[j] * inner for _, sizes, _, inner in specs) for j in range(W)]
        longest = max(totals)
        buf = torch.zeros(longest, dtype=dtype, device=device)
        if totals[mesh.get_local_rank(d)]:
            torch.cat([local(items[i][0]).reshape(-1) for i in idx], out=buf[: totals[mesh.get_local_rank(d)]])
        parts = [torch.empty_like(buf) for _ in range(W)]
        start = time.perf_counter()
        dist.all_gather(parts, buf, group=group)
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.bytes += buf.numel() * buf.element_size()
        stats.redistributed += buf.numel() * buf.element_size()
        pieces: list[list[Tensor]] = [[] for _ in idx]
        for j, part in enumerate(parts):
            offset = 0
            for k, (dim, sizes, shape, inner) in enumerate(specs):
                n = sizes[j] * inner
                pieces[k].append(part[offset: offset + n].view(shape[:dim] + [sizes[j]] + shape[dim + 1:]))
                offset += n
        for k, i in enumerate(idx):
            t, work = items[i]
            whole = torch.cat(pieces[k], dim=specs[k][0])
            out[i] = DTensor.from_local(whole, t.device_mesh, work, run_check=False, shape=t.shape, stride=t.stride())
    return out  # type: ignore[return-value]


def _own_part(work: Tensor, original: Tensor) -> Tensor:
    """This rank's shard of the whole work copy ``work``, shaped like ``original``'s local shard: a
    slice where the batched gather made it (no ``DTensor`` dispatch per tensor), else
    ``DTensor.redistribute`` back to the original placements (also local: a replicated tensor's
    own shard)."""
    d = _gather_dim(original, tuple(work.placements))
    if d is None:
        return local(_redistribute(work, tuple(original.placements)))
    dim = original.placements[d].dim % original.dim()
    mesh = original.device_mesh
    sizes = _chunk_sizes(original.shape[dim], mesh.size(d))
    k = mesh.get_local_rank(d)
    return local(work).narrow(dim, sum(sizes[:k]), sizes[k])


@contextlib.contextmanager
def restaged(pairs: Iterable[LoRAPair], optimizer: torch.optim.Optimizer | None, write_factors: bool) -> Iterator[None]:
    """Within the block, ``pairs`` whose factors are sharded along their rank dimension read and
    write whole work copies (gathered along that mesh dimension): their views (``a()``,
    ``grad_a()``, ...) and, with ``write_factors`` (parameter space), the optimizer's state
    entries of those factors.

    On leaving the block normally, each rank copies its own part of the gradients (and with
    ``write_factors`` of the factors and the state) back into its original shards, in place (no
    communication), and the state entries are the original tensors again. If the block raises,
    the work copies are dropped unwritten (the step core checks everything before it writes).

    Every rank must enter with the same pairs (the gathers are collectives).
    """
    todo = [(p, role) for p in pairs for role in moved_roles(p)]
    if not todo:
        yield
        return
    # what to gather, and where each copy goes: (tensor, work placements, pair, staged key or None,
    # state dict and key or None)
    wanted: list[tuple[Tensor, tuple, Any, str | None, tuple[dict, Any] | None]] = []
    for p, role in todo:
        param = p.A if role == "A" else p.B
        work = p.sharding.work[0 if role == "A" else 1]  # type: ignore[attr-defined]
        wanted.append((param, work, p, role, None))
        if param.grad is not None:
            wanted.append((param.grad, work, p, "g" + role, None))
        state = optimizer.state.get(param) if (write_factors and optimizer is not None) else None
        for key, value in list((state or {}).items()):
            if is_dtensor(value) and value.shape == param.shape and tuple(value.placements) == tuple(param.placements):
                wanted.append((value, work, p, None, (state, key)))
    writes: list[tuple[Tensor, Tensor]] = []  # (original, work copy) to copy back
    swapped: list[tuple[dict, Any, Tensor]] = []  # (state dict, key, original) to restore
    try:
        copies = _gather_all([(t, work) for t, work, *_ in wanted])
        for (t, _, p, key, entry), copy in zip(wanted, copies):
            if key is not None:
                p.staged[key] = copy
                if key.startswith("g") or write_factors:
                    writes.append((t, copy))
            else:
                state, skey = entry  # type: ignore[misc]
                state[skey] = copy
                swapped.append((state, skey, t))
        yield
    except BaseException:
        for state, skey, original in swapped:
            state[skey] = original
        for p, _ in todo:
            p.staged.clear()  # type: ignore[attr-defined]
        raise
    for original, work in writes:
        local(original).copy_(_own_part(work, original))
    for state, skey, original in swapped:
        # (the entry the step left: a transport may have replaced the work copy by a new tensor)
        local(original).copy_(_own_part(state[skey], original))
        state[skey] = original
    for p, _ in todo:
        p.staged.clear()  # type: ignore[attr-defined]
