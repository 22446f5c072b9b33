r"""RefLoRA on sharded factors: FSDP2 / DTensor (arXiv 2505.18877).

Under ``torch.distributed.fsdp.fully_shard`` (FSDP2) every factor, its gradient and its
optimizer state are ``DTensor`` shards. RefLoRA needs two things from the whole factors, both
``r x r``: the Grams ``X = A A^T``, ``Y = B^T B`` (full variant) or the squared norms
``||A||_F^2``, ``||B||_F^2`` (scalar variant). Everything else, the ``O((m + n) r^2)`` products and
every transform of factors, gradients and state, works on a rank's own rows or columns.

Design (one collective per same-shape group per step, never a gather)::

    A (r, m) sharded along m  ->  A_k A_k^T is a partial sum of X      (columns of A on rank k)
    B (n, r) sharded along n  ->  B_k^T B_k is a partial sum of Y      (rows of B on rank k)
    [X_1 .. X_G, Y_1 .. Y_G] (float64, 2 G r^2 numbers)  --all_reduce(SUM)-->  identical on every rank
    r x r kernel on every rank (identical inputs -> identical outputs)
    T @ A_k, B_k @ T', the gradients and the optimizer state: local

The scalar variant all-reduces ``2 G`` squared norms instead, and works with any placement
(a norm is a sum over all entries). The full variant works on ``A`` sharded along ``m`` (its
columns) and ``B`` along ``n`` (its rows): a shard of the rank dimension ``r`` holds rows of ``A``
that ``A A^T`` and ``P^T A`` mix with rows on other ranks. FSDP2's default ``Shard(0)`` is right
for ``B = lora_B.weight`` ``(n, r)`` but splits ``r`` of ``A = lora_A.weight`` ``(r, m)``; the
full variant then steps on whole copies of ``A``, its gradient and its optimizer state, gathered
before the step, and each rank keeps its own rows of the result (:mod:`reflora.reshard`), which
costs a few times ``A``'s size in traffic per step. :func:`lora_shard_placement` shards ``A`` along ``m`` in
the first place and saves that traffic. Placements that still cannot work raise at
:func:`reflora.attach`, naming the pair and the fix: an expert stack sharded across its experts'
slices.

Replicated mesh dimensions (HSDP's ``(Replicate(), Shard(0))``, DDP) need no reduction: the
collective runs over the mesh dimensions a factor is sharded on, and a factor replicated along
such a dimension contributes its Gram from one coordinate only (it is not counted twice).
Reductions use ``SUM`` (gloo's ``AVG`` has had correctness bugs, and a sum is what a Gram is).

Not supported, with a clear error: ``Partial`` placements, a pair whose ``A`` and ``B`` live on
different meshes or where only one is a ``DTensor`` (at ``attach``), and the hooks inside a
compiled ``opt.step()`` on sharded factors (at that step: the collective would have to be traced;
``attach(..., compile=True)``, which compiles the ``r x r`` kernel only, works).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import Tensor, nn

from reflora.pairs import EXPERT_LAYOUTS, LoRAPair, to_core

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.tensor import Shard

__all__ = [
    "CommStats",
    "ShardedLoRAPair",
    "ShardingError",
    "any_sharded",
    "comm_stats",
    "group_key",
    "is_dtensor",
    "local",
    "localize",
    "lora_shard_placement",
    "reduce_grams",
    "reduce_sq_norms",
]


class ShardingError(ValueError):
    """A factor's sharding cannot be used by the requested RefLoRA mode (the message says why)."""


_DTENSOR: list[type | None] = []  # the DTensor class (or None), imported once: the hook asks per tensor


def _dtensor_type() -> type | None:
    if not _DTENSOR:
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR.append(DTensor)
        else:
            _DTENSOR.append(None)
    return _DTENSOR[0]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters, grads, state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (the tensor itself if it is not a ``DTensor``).

    The shard shares storage with the ``DTensor``: writing into it with ``copy_`` updates the
    parameter, its gradient or its optimizer state.
    """
    return t.to_local() if is_dtensor(t) else t


# ----------------------------------------------------------------------------- communication


@dataclass
class CommStats:
    """What the hooks sent through collectives (all ranks count the same). Reset with ``reset()``."""

    calls: int = 0
    bytes: int = 0  # the payload handed to the collectives: the all-reduced tensor, a redistributed shard
    seconds: float = 0.0  # wall time inside the collectives (synchronous calls)
    redistributed: int = 0  # of ``bytes``, those of redistributions (reflora.reshard: a rank dimension sharded)

    def reset(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0
        self.redistributed = 0


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The process-wide :class:`CommStats` of RefLoRA's collectives (for benchmarks and tests)."""
    return _STATS


# ----------------------------------------------------------------------------- placements

# Stored dimensions along which a shard holds whole columns of A's core view (r, m) or whole rows
# of B's (n, r): the dimensions whose shards give partial Grams and local r x r transforms.
# ("flatten": any dimension of A's kernel but the first; the order of columns does not matter
# for A A^T nor for T @ A.)
def _outer_dims(role: str, layout: str, ndim: int, experts: int) -> tuple[int, ...]:
    if layout == "plain" or (layout in EXPERT_LAYOUTS and experts == 1):
        return (1,) if role == "A" else (0,)
    if layout == "transposed":
        return (0,) if role == "A" else (1,)
    if layout == "flatten":
        return tuple(range(1, ndim)) if role == "A" else (0,)
    # expert stacks: A is expert_rows (E * r, m) -> columns; B is expert_cols (n, r * E) -> rows
    if layout == "expert_rows" and role == "A":
        return (1,)
    if layout == "expert_cols" and role == "B":
        return (0,)
    return ()


def _what_dim(role: str, layout: str, dim: int, experts: int) -> str:
    """What a stored dimension that is not in :func:`_outer_dims` holds (for error messages)."""
    if experts > 1:
        return f"a dimension that stacks the {experts} experts' slices"
    if layout == "flatten" and role == "B" and dim >= 2:
        return "a 1x1 kernel dimension"
    return "its rank dimension r"


@dataclass(frozen=True)
class _FactorSharding:
    mesh: Any
    placements: tuple
    shard_mesh_dims: tuple[int, ...]  # mesh dimensions along which this factor (or its work copy) is sharded
    # the placements of the work copy the full variant steps on (its rank dimension sharded: see
    # reflora.reshard, gathered along those mesh dimensions), or None where the factor is used as it is
    work: tuple | None = None


@dataclass(frozen=True)
class _PairSharding:
    mesh: Any
    reduce_dims: tuple[int, ...]  # mesh dims to all-reduce over, one collective each
    # per reduced mesh dim: (contributes A, contributes B) on this rank. A factor replicated along a
    # reduced dim contributes at coordinate 0 only, so that the sum counts it once.
    contrib: tuple[tuple[bool, bool], ...]
    key: tuple
    work: tuple[tuple | None, tuple | None] = (None, None)  # work placements of (A, B), see _FactorSharding


def _factor_sharding(pair: LoRAPair, role: str, t: Tensor, variant: str) -> _FactorSharding:
    from torch.distributed.tensor import Replicate, Shard

    layout = pair.layout[0 if role == "A" else 1]
    where = f"pair {pair.name!r}: {role} (stored shape {tuple(t.shape)})"
    mesh, placements = t.device_mesh, tuple(t.placements)
    outer = _outer_dims(role, layout, t.dim(), pair.experts)
    dims = []
    work = list(placements)
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, Shard):
            raise ShardingError(
                f"{where} has placement {pl!r} on mesh dimension {mesh_dim} ({placements}); RefLoRA "
                "supports Shard and Replicate placements of the factors (FSDP2, HSDP), not pending "
                "reductions (Partial): reduce the factor before the optimizer step"
            )
        dim = pl.dim % t.dim()
        expert_stack = pair.experts > 1
        if dim not in outer and expert_stack:
            raise ShardingError(
                f"{where} is sharded along stored dimension {dim} ({pl!r} on mesh dimension {mesh_dim} of size "
                f"{mesh.size(mesh_dim)}), which splits {_what_dim(role, layout, dim, pair.experts)}: the per-expert "
                f"Grams and norms of an expert stack ({pair.experts} experts) need each expert's slice whole. Shard "
                "A along m and B along n: pass shard_placement_fn=reflora.distributed.lora_shard_placement(model) "
                "to every fully_shard call"
            )
        if dim not in outer and variant == "full":
            # the full variant mixes A's r rows (A A^T, P^T A, S^-1 grad_A) and B's r columns: it
            # steps on a copy gathered along this mesh dimension (reflora.reshard), which counts
            # its Gram once (as a replicated factor's), and keeps its own rows of the result
            work[mesh_dim] = Replicate()
            continue
        dims.append(mesh_dim)
    moved = tuple(work) != placements
    return _FactorSharding(mesh, placements, tuple(dims), tuple(work) if moved else None)


@dataclass(frozen=True, eq=False)
class ShardedLoRAPair(LoRAPair):
    """A :class:`~reflora.LoRAPair` of ``DTensor`` factors whose views are this rank's shards.

    :meth:`a`, :meth:`b`, :meth:`grad_a`, :meth:`grad_b` return local views (no communication);
    :attr:`shape` and :attr:`rank` are the global ones. Built by :func:`localize`.
    """

    sharding: _PairSharding | None = field(default=None, repr=False)
    global_shape: tuple[int, int, int] | None = field(default=None, repr=False)
    # during RefLoRA's step: the gathered work copies ("A", "gA", "B", "gB") of factors sharded along
    # their rank dimension (reflora.reshard); the views below read these instead of the factors
    staged: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # built by localize() from a validated LoRAPair; LoRAPair's checks read a() / b(), which
        # are local here (with a sharded rank dimension, A's local rank is not B's)
        pass

    def _view(self, role: str, t: Tensor | None, key: str) -> Tensor | None:
        if t is None:
            return None
        side = 0 if role == "A" else 1
        if self.sharding is not None and self.sharding.work[side] is not None:
            w = self.staged.get(key)
            if w is None:
                raise RuntimeError(
                    f"pair {self.name!r}: {role} is sharded along its rank dimension ({tuple(t.placements)}); its "
                    "local rows are not what the full variant works on. Read it inside RefLoRA's step (reflora.reshard."
                    "restaged gathers it), or shard it with lora_shard_placement"
                )
            t = w
        return to_core(local(t), self.layout[side], self.experts)

    def a(self) -> Tensor:
        return self._view("A", self.A, "A")  # type: ignore[return-value]

    def b(self) -> Tensor:
        return self._view("B", self.B, "B")  # type: ignore[return-value]

    def grad_a(self) -> Tensor | None:
        return self._view("A", self.A.grad, "gA")

    def grad_b(self) -> Tensor | None:
        return self._view("B", self.B.grad, "gB")

    @property
    def rank(self) -> int:
        assert self.global_shape is not None
        return self.global_shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        assert self.global_shape is not None
        return self.global_shape

    def delta(self) -> Tensor:
        """``B @ A`` of the whole factors. Gathers both (for inspection and tests, not for training)."""
        with torch.no_grad():
            A, B = self.A.full_tensor(), self.B.full_tensor()
            return to_core(B, self.layout[1], self.experts) @ to_core(A, self.layout[0], self.experts)


def _pair_sharding(pair: LoRAPair, variant: str) -> _PairSharding:
    a, b = (_factor_sharding(pair, role, t, variant) for role, t in (("A", pair.A), ("B", pair.B)))
    if a.mesh != b.mesh:
        raise ShardingError(
            f"pair {pair.name!r}: A lives on {a.mesh} but B on {b.mesh}; RefLoRA reduces a pair's Grams over "
            "one device mesh: shard both factors of a LoRA module with the same fully_shard mesh"
        )
    mesh = a.mesh
    reduce_dims = tuple(sorted(set(a.shard_mesh_dims) | set(b.shard_mesh_dims)))
    coord = mesh.get_coordinate()
    if coord is None:
        raise ShardingError(f"pair {pair.name!r}: this rank is not part of the factors' mesh {mesh}")
    contrib = tuple(
        (d in a.shard_mesh_dims or coord[d] == 0, d in b.shard_mesh_dims or coord[d] == 0) for d in reduce_dims
    )
    # by content: fully_shard builds a new DeviceMesh object per call when none is given
    key = (mesh.device_type, tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names,
           a.work or a.placements, b.work or b.placements)
    return _PairSharding(mesh, reduce_dims, contrib, key, (a.work, b.work))


def localize(pairs: Iterable[LoRAPair], variant: str) -> list[LoRAPair]:
    """Pairs whose factors are ``DTensor`` s become :class:`ShardedLoRAPair` (local views, known
    reductions); other pairs are returned as they are. Raises :class:`ShardingError` for
    placements ``variant`` cannot use, naming the pair and the fix."""
    out: list[LoRAPair] = []
    for p in pairs:
        da, db = is_dtensor(p.A), is_dtensor(p.B)
        if not (da or db):
            out.append(p)
            continue
        if da != db:
            which, other = ("A", "B") if da else ("B", "A")
            raise ShardingError(
                f"pair {p.name!r}: {which} is a DTensor (sharded) but {other} is a plain tensor; shard both "
                "factors of a LoRA module with the same fully_shard call (or neither)"
            )
        if isinstance(p, ShardedLoRAPair):
            out.append(p)
            continue
        sharding = _pair_sharding(p, variant)
        sp = ShardedLoRAPair(p.name, p.A, p.B, p.layout, p.module, p.experts)
        object.__setattr__(sp, "global_shape", p.shape)
        object.__setattr__(sp, "sharding", sharding)
        out.append(sp)
    return out


def group_key(pair: LoRAPair) -> tuple | None:
    """Part of the same-shape grouping key: pairs reduced together share a mesh and placements."""
    s = getattr(pair, "sharding", None)
    return None if s is None else s.key


def _all_reduce(parts: list[tuple[Tensor, int]], sharding: _PairSharding) -> list[Tensor]:
    """Sum ``parts`` (tensor, role: 0 for A, 1 for B) over the reduced mesh dims: one collective
    of the concatenated parts per reduced dim (one for FSDP2 and HSDP)."""
    import torch.distributed as dist

    shapes = [t.shape for t, _ in parts]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([t.reshape(-1) for t, _ in parts])
    for d, contrib in zip(sharding.reduce_dims, sharding.contrib):
        if not all(contrib):
            # a factor replicated along this mesh dim holds the same value at every coordinate:
            # only coordinate 0 adds it in, so the sum counts it once
            keep = [contrib[role] for _, role in parts]
            flat = torch.cat([c if k else torch.zeros_like(c) for c, k in zip(flat.split(sizes), keep)])
        start = time.perf_counter()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sharding.mesh.get_group(d))
        _STATS.seconds += time.perf_counter() - start
        _STATS.calls += 1
        _STATS.bytes += flat.numel() * flat.element_size()
    return [c.view(s) for c, s in zip(flat.split(sizes), shapes)]


def reduce_grams(pairs: list[LoRAPair], X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """The Grams of a group from this rank's partial ones: one all-reduce of ``[X; Y]`` per sharded
    mesh dimension (one for FSDP2 and HSDP). A no-op for unsharded pairs."""
    s = getattr(pairs[0], "sharding", None)
    if s is None or not s.reduce_dims:
        return X, Y
    X, Y = _all_reduce([(X, 0), (Y, 1)], s)
    return X, Y


def reduce_sq_norms(pairs: list[LoRAPair], a_sq: Tensor, b_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Squared Frobenius norms of a group from this rank's partial ones (scalar variant)."""
    s = getattr(pairs[0], "sharding", None)
    if s is None or not s.reduce_dims:
        return a_sq, b_sq
    a_sq, b_sq = _all_reduce([(a_sq, 0), (b_sq, 1)], s)
    return a_sq, b_sq


def any_sharded(pairs: Iterable[LoRAPair]) -> bool:
    return any(getattr(p, "sharding", None) is not None for p in pairs)


# ----------------------------------------------------------------------------- fully_shard helper


def lora_shard_placement(
    model: nn.Module | Iterable[LoRAPair], shard_size: int | None = None
) -> Callable[[nn.Parameter], "Shard | None"]:
    r"""A ``shard_placement_fn`` for ``fully_shard`` that shards every LoRA ``A`` along ``m``.

    FSDP2 shards each parameter along dimension 0 by default, which is right for ``lora_B.weight``
    ``(n, r)`` but splits the rank dimension of ``lora_A.weight`` ``(r, m)``, whose rows the full
    variant of RefLoRA mixes: it then gathers ``A``, its gradient and its optimizer state
    for each step (:mod:`reflora.reshard`). With this function ``A`` is sharded along its ``m``
    dimension (dimension 1 of ``lora_A.weight``), ``B`` along ``n``, every other parameter as
    FSDP2 would, and the step needs one small all-reduce per same-shape group and nothing else.

    FSDP2 shards dimensions other than 0 evenly only: an ``A`` whose ``m`` is not a multiple of
    ``shard_size`` keeps ``Shard(0)`` (with a warning naming it; both variants still work there,
    the full variant gathering them).

    Build it from the model *before* sharding (it recognises the parameters by identity, and
    ``fully_shard`` replaces them) and pass it to every ``fully_shard`` call::

        place = reflora.distributed.lora_shard_placement(peft_model)
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(peft_model, shard_placement_fn=place)

    Args:
        model: the model (pairs found by :func:`reflora.adapters.find_pairs`) or its pairs.
        shard_size: ranks along the sharding mesh dimension (default: the world size; the shard
            group's size under HSDP).
    """
    import warnings

    from torch.distributed.tensor import Shard

    if isinstance(model, nn.Module):
        from reflora.adapters import find_pairs

        pairs = find_pairs(model)
    else:
        pairs = list(model)
    if shard_size is None:
        shard_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    chosen: dict[int, int | None] = {}
    uneven: list[str] = []
    for p in pairs:
        for role, t, lay in (("A", p.A, p.layout[0]), ("B", p.B, p.layout[1])):
            dims = _outer_dims(role, lay, t.dim(), p.experts)
            dim = next((d for d in dims if d == 0 or t.shape[d] % shard_size == 0), None)
            if dim is None and dims:
                uneven.append(f"{p.name!r} {role} {tuple(t.shape)}")
            chosen[id(t)] = dim
    if uneven:
        warnings.warn(
            f"FSDP2 shards dimensions other than 0 evenly only; {len(uneven)} factor(s) cannot be sharded along "
            f"m / n over {shard_size} ranks and keep FSDP2's default Shard(0): {', '.join(uneven[:4])}"
            f"{' ...' if len(uneven) > 4 else ''}. The full variant gathers them for each step "
            "(reflora.reshard: more traffic); the scalar variant uses them as they are",
            stacklevel=2,
        )

    def shard_placement_fn(param: nn.Parameter) -> Shard | None:
        dim = chosen.get(id(param))
        return None if dim is None else Shard(dim)

    return shard_placement_fn
