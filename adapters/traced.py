"""Traced discovery: find LoRA pairs from what the forward pass computes, and prove each one.

:func:`trace_pairs` runs the model once on example inputs, proposes every pair of trainable
parameters that meet as the two factors of a product (``reflora.adapters._proposals``), and
keeps a proposal only if refactoring it leaves the model's outputs unchanged:

.. math::

    f(\\ldots, P^T A, B P^{-T}, \\ldots) = f(\\ldots, A, B, \\ldots)
    \\quad\\text{for a random dense well-conditioned } P \\in GL(r).

That is the property RefLoRA (arXiv 2505.18877) relies on: the model depends on ``A`` and ``B``
only through ``B A``. Verification runs on random values of the candidate factors (so ``B = 0``
at initialisation proves nothing by accident), with every ``training`` flag off and the RNG forked and seeded
(dropout off, any other randomness identical between the runs), and in three steps:

1. one forward and backward pass checks the first-order form of the invariance for every
   candidate and every layout hypothesis at once: for a true pair the gradients satisfy
   ``A G_A^T = G_B^T B`` (the derivative of the output along ``P = I + t X`` vanishes for every
   ``X``); a proposal failing it is rejected without a forward pass of its own;
2. one forward pass refactors all surviving candidates jointly with independent random ``P``
   (``Q_1 diag(s) Q_2``, ``s`` in ``[1, 2]``: dense, condition number at most 2, not orthogonal,
   not diagonal) and compares the outputs: relative error at most ``1e-5`` in float32;
3. only if that fails, the set is bisected until the offending candidates are isolated.

So discovery costs about four forward passes and one backward pass, once; nothing is added to
training steps.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from reflora.adapters.traced import trace_pairs
    >>> class Net(nn.Module):  # a LoRA with names no finder knows
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.base = nn.Linear(16, 8).requires_grad_(False)
    ...         self.U = nn.Parameter(torch.randn(4, 16))
    ...         self.V = nn.Parameter(torch.zeros(8, 4))
    ...     def forward(self, x):
    ...         return self.base(x) + (x @ self.U.T) @ self.V.T
    >>> report = trace_pairs(Net(), torch.randn(3, 16))
    >>> [(p.name, p.shape) for p in report.pairs]
    [('U+V', (4, 16, 8))]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from reflora.adapters._proposals import ProposalMode, Sighting
from reflora.pairs import LoRAPair, canonical_name, from_core, to_core

__all__ = ["Candidate", "DiscoveryReport", "trace_pairs"]

# relative output error a true pair may show, by the lowest float precision involved
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# the first-order check only screens (the joint refactor decides), so it is looser
_GTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
_SEED = 20250518  # arXiv 2505.18877


@dataclass(frozen=True)
class Candidate:
    """One proposal of traced discovery and what became of it.

    Attributes:
        A: qualified name of the parameter proposed as the down-projection.
        B: qualified name of the parameter proposed as the up-projection.
        where: the op(s) where the two met (``"mm"``, ``"convolution"``, ...), and how
            (``chain``: ``B`` applied to ``A``'s output; ``product``: ``B @ A`` formed).
        between: ops between the two factors that are not views or scalings (``relu``,
            ``native_layer_norm``, ...); empty for a clean product.
        found: whether it became a pair.
        reason: why it was rejected, or the layout it was found with.
        pair: the pair, when found.
        through: trainable parameters mixed in between the factors (a per-rank gate, the bias
            of the down projection, fused into ``addmm`` or a convolution); such a proposal is
            rejected, since training moves them away from the neutral values they may have now.
    """

    A: str
    B: str
    where: str
    between: tuple[str, ...]
    found: bool
    reason: str
    pair: LoRAPair | None = field(default=None, repr=False)
    through: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiscoveryReport:
    """What discovery considered, found and rejected (``find_pairs(..., explain=True)``).

    Attributes:
        pairs: every pair found, structural finders' first.
        structural: the pairs the registered finders found (no example input needed).
        traced: the pairs traced discovery found and verified.
        considered: trainable parameters (2-D or more) that traced discovery looked at: those
            the structural finders did not claim. Empty when no example inputs were given.
        candidates: every proposal, found or rejected, with the reason.
        unpaired: considered parameters that ended in no pair, with the reason.
        traced_run: whether traced discovery ran (it needs ``example_inputs``).
        unreached: names of the structural pairs whose factors the forward pass on
            ``example_inputs`` never used (a LoRA wrapper its parent bypasses, an expert no
            input was routed to). Empty when no example inputs were given.
    """

    pairs: list[LoRAPair]
    structural: list[LoRAPair]
    traced: list[LoRAPair]
    considered: list[str]
    candidates: list[Candidate]
    unpaired: dict[str, str]
    traced_run: bool
    unreached: list[str] = field(default_factory=list)

    @property
    def unused(self) -> list[str]:
        """Considered parameters the forward pass never read (so no pair could be found for them)."""
        return [n for n, why in self.unpaired.items() if why.startswith(_UNUSED)]

    @property
    def rejected(self) -> list[Candidate]:
        """The proposals that did not become pairs."""
        return [c for c in self.candidates if not c.found]

    def __str__(self) -> str:
        lines = [f"structural finders found {len(self.structural)} pair(s)"]
        lines += [f"  {_describe(p)}" for p in self.structural]
        if not self.traced_run:
            lines.append("traced discovery did not run: pass example_inputs= to find pairs from a forward pass")
            return "\n".join(lines)
        lines.append(f"traced discovery considered {len(self.considered)} trainable parameter(s) not in those pairs")
        lines.append(f"found by tracing and verified: {len(self.traced)}")
        lines += [f"  {_describe(p)}" for p in self.traced]
        rejected = self.rejected
        if self.unreached:
            lines.append(f"structural pairs the forward pass did not reach: {', '.join(map(repr, self.unreached))}")
        lines.append(f"rejected proposals: {len(rejected)}")
        for c in rejected:
            between = [*c.between, *(f"trainable {n}" for n in c.through)]
            between = f" [between them: {', '.join(between)}]" if between else ""
            lines.append(f"  A={c.A} B={c.B} (met in {c.where}){between}: {c.reason}")
        lines.append(f"in no pair: {len(self.unpaired)}")
        lines += [f"  {n}: {why}" for n, why in self.unpaired.items()]
        return "\n".join(lines)


_UNUSED = "not used by the forward pass"


def _describe(p: LoRAPair) -> str:
    r, m, n = p.shape
    experts = f", experts={p.experts}" if p.experts > 1 else ""
    return f"{p.name}: r={r}, m={m}, n={n}, layout={p.layout}{experts}"


# ------------------------------------------------------------------------------------- inputs


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs given as a mapping must have str keys (keyword arguments of forward)")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple / list of positional arguments or a dict of keyword "
        f"arguments for model.forward; got {type(example_inputs).__name__}"
    )


def _leaves(obj: Any) -> list[Tensor]:
    """Floating-point tensors of a model output (tensors, tuples, dicts, dataclasses, ModelOutput)."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() or obj.is_complex() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _leaves(getattr(obj, f.name))]
    return []


# ----------------------------------------------------------------------------- layout guesses


@dataclass(frozen=True)
class _Hypothesis:
    a: int
    b: int
    layout: tuple[str, str]
    experts: int


def _a_layouts(shape: torch.Size, r: int) -> list[tuple[str, int | None]]:
    """Ways a parameter of ``shape`` can be the down-projection of rank ``r`` (E: experts or None)."""
    if len(shape) > 2:
        return [("flatten", 1)] if shape[0] == r else []
    p, q = shape
    out: list[tuple[str, int | None]] = []
    if p == r:
        out += [("plain", 1), ("expert_cols", None)]
    if q == r:
        out.append(("transposed", 1))
    if p % r == 0 and p // r > 1:
        out.append(("expert_rows", p // r))
    return out


def _b_layouts(shape: torch.Size, r: int) -> list[tuple[str, int | None]]:
    """Ways a parameter of ``shape`` can be the up-projection of rank ``r``."""
    if len(shape) > 2:
        return [("flatten", 1)] if shape[1] == r and all(k == 1 for k in shape[2:]) else []
    p, q = shape
    out: list[tuple[str, int | None]] = []
    if q == r:
        out += [("plain", 1), ("expert_rows", None)]
    if p == r:
        out.append(("transposed", 1))
    if q % r == 0 and q // r > 1:
        out.append(("expert_cols", q // r))
    return out


def _hypotheses(s: Sighting, params: list[Tensor], swap: bool) -> list[_Hypothesis]:
    a, b = (s.b, s.a) if swap else (s.a, s.b)
    A, B = params[a], params[b]
    out = []
    for la, ea in _a_layouts(A.shape, s.r):
        for lb, eb in _b_layouts(B.shape, s.r):
            expert = (la in ("expert_rows", "expert_cols"), lb in ("expert_rows", "expert_cols"))
            if expert[0] != expert[1]:
                continue
            if not expert[0]:
                out.append(_Hypothesis(a, b, (la, lb), 1))
                continue
            known = {e for e in (ea, eb, s.experts) if e is not None}
            for E in sorted(known):
                if E > 1 and all(x in (None, E) for x in (ea, eb)):
                    out.append(_Hypothesis(a, b, (la, lb), E))
    valid = []
    for h in out:
        try:
            pair = LoRAPair("", params[h.a], params[h.b], h.layout, experts=h.experts)
        except (ValueError, TypeError):
            continue
        if pair.rank == s.r:
            valid.append(h)
    # batched over stored experts: expert layouts first, else last; PEFT's (expert_rows,
    # expert_cols) before other expert orders; plain before transposed
    rank = {"plain": 0, "flatten": 0, "expert_rows": 0, "transposed": 1, "expert_cols": 1}

    def key(h: _Hypothesis) -> tuple[int, int]:
        if h.experts > 1:
            first = 0 if (s.experts or 1) > 1 else 2
            return first, rank[h.layout[0]] + 1 - rank[h.layout[1]]
        return 1, rank[h.layout[0]] + rank[h.layout[1]]

    return sorted(valid, key=key)


# ---------------------------------------------------------------------------------- refactor


def _random_like(p: Tensor, g: torch.Generator) -> Tensor:
    flat = p.reshape(p.shape[0], -1)
    std = 1.0 / math.sqrt(max(flat.shape))
    return (torch.randn(p.shape, generator=g, dtype=torch.float64) * std).to(p.device, p.dtype)


def _random_P(E: int, r: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``P`` and ``P^{-T}`` (float64, ``(E, r, r)``): ``Q1 diag(s) Q2``, ``s`` in [1, 2]."""
    q1, _ = torch.linalg.qr(torch.randn(E, r, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(E, r, r, generator=g, dtype=torch.float64))
    s = 1.0 + torch.rand(E, r, 1, generator=g, dtype=torch.float64)
    return q1 @ (s * q2), q1 @ (q2 / s)


def _core(t: Tensor, h: _Hypothesis, role: int) -> Tensor:
    v = to_core(t, h.layout[role], h.experts)
    return v if h.experts > 1 else v.unsqueeze(0)


def _refactored(values: dict[int, Tensor], hyps: list[_Hypothesis], g: torch.Generator) -> dict[int, Tensor]:
    out = dict(values)
    for h in hyps:
        a = _core(values[h.a], h, 0).double()
        b = _core(values[h.b], h, 1).double()
        P, P_inv_T = (t.to(a.device) for t in _random_P(a.shape[0], a.shape[1], g))
        a2, b2 = P.mT @ a, b @ P_inv_T
        for idx, new, role in ((h.a, a2, 0), (h.b, b2, 1)):
            t = values[idx]
            new = new if h.experts > 1 else new.squeeze(0)
            out[idx] = from_core(new.to(t.dtype), h.layout[role], t.shape, h.experts).contiguous()
    return out


# ------------------------------------------------------------------------------------ runner


class _Runner:
    """Evaluates the model with some parameters replaced, in eval mode, with the RNG fixed.

    ``fixed`` (name -> value) is substituted in every evaluation: the other trainable parameters
    at perturbed values (:func:`_perturbed`).
    """

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> None:
        self.model, self.args, self.kwargs, self.names = model, args, kwargs, names
        self.devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self.fixed: dict[str, Tensor] = {}

    def __call__(self, values: dict[int, Tensor]) -> Any:
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(_SEED)
            subs = {**self.fixed, **{self.names[i]: t for i, t in values.items()}}
            return torch.func.functional_call(self.model, subs, self.args, self.kwargs, strict=False)


def _perturbed(p: Tensor, g: torch.Generator) -> Tensor:
    """``p`` plus noise of about half its RMS (at least ``0.5 / sqrt(size of its last dim)``): a
    gate initialised to ones or a bias to zeros no longer looks neutral, and the model stays in the
    range it was built for."""
    x = p.detach().double()
    width = p.shape[-1] if p.dim() else 1
    scale = 0.5 * max(float(x.square().mean().sqrt()) if x.numel() else 0.0, 1.0 / math.sqrt(max(width, 1)))
    return (x.cpu() + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(p.device, p.dtype)


def _rel_error(out: list[Tensor], ref: list[Tensor]) -> float:
    if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
        return math.inf
    num = sum(float((o.double() - r.double()).square().sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().square().sum()) for r in ref)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def _identity_error(h: _Hypothesis, values, grads) -> float | None:
    """``||A G_A^T - G_B^T B|| / (||A|| ||G_A|| + ||G_B|| ||B||)``; None when both gradients are 0."""
    ga, gb = grads.get(h.a), grads.get(h.b)
    if ga is None and gb is None:
        return None
    a = _core(values[h.a].detach(), h, 0).double()
    b = _core(values[h.b].detach(), h, 1).double()
    ga = torch.zeros_like(a) if ga is None else _core(ga, h, 0).double()
    gb = torch.zeros_like(b) if gb is None else _core(gb, h, 1).double()
    scale = float(a.norm() * ga.norm() + b.norm() * gb.norm())
    if scale == 0.0:
        return None
    return float((a @ ga.mT - gb.mT @ b).norm()) / scale


# ------------------------------------------------------------------------------------- naming


def _pair_name(a: str, b: str) -> str:
    sa, sb = a.split("."), b.split(".")
    k = 0
    while k < min(len(sa), len(sb)) - 1 and sa[k] == sb[k]:
        k += 1
    s = 0
    while s < min(len(sa), len(sb)) - k - 1 and sa[-1 - s] == sb[-1 - s]:
        s += 1
    suffix = sa[len(sa) - s:] if s else []
    if suffix and suffix[-1] == "weight":  # a layer's weight: name the pair after the adapter
        suffix = suffix[:-1]
    return canonical_name(".".join(sa[:k] + suffix)) or factor_name(a, b)


def factor_name(a: str, b: str) -> str:
    """A pair named after its factors' qualified names, ``"U+V"`` (``.weight`` dropped): for pairs
    of raw parameters that share no module below the root, or two pairs that would share a name."""
    return "+".join(canonical_name(n.removesuffix(".weight")) for n in (a, b))


def _unique_names(found: list[tuple[str, str, LoRAPair]], taken: set[str]) -> list[LoRAPair]:
    names = [_pair_name(a, b) for a, b, _ in found]
    out = []
    for (a, b, pair), name in zip(found, names):
        if names.count(name) > 1 or name in taken:  # e.g. two pairs of raw parameters in one module
            name = factor_name(a, b)
        out.append(dataclasses.replace(pair, name=name))
    return out


# --------------------------------------------------------------------------------------- main


def trace_pairs(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Iterable[Tensor] = (),
    structural: Iterable[LoRAPair] = (),
) -> DiscoveryReport:
    """Find and verify LoRA pairs from one forward pass of ``model`` on ``example_inputs``.

    Any two trainable parameters ``A`` and ``B`` (2-D, or a conv kernel for ``A`` / a ``1 x 1``
    kernel for ``B``) that meet as the factors of a product are proposed, and kept only if a
    random refactor ``(P^T A, B P^{-T})`` leaves the outputs unchanged (see the module docstring).
    Layouts follow :mod:`reflora.pairs`: transposed storage, conv kernels (``"flatten"``) and
    experts stacked as PEFT stacks them (``"expert_rows"`` / ``"expert_cols"``).

    The model is left as it was: parameters are substituted with
    :func:`torch.func.functional_call`, ``training`` flags and buffers are restored (the flags are
    set directly, not through ``eval()``, which loralib overrides to merge its factors).

    Args:
        model: any ``nn.Module``.
        example_inputs: what ``model`` is called with: a tensor, a tuple / list of positional
            arguments, or a dict of keyword arguments. Every adapter it should find must be
            used by this forward pass (for an MoE whose experts are separate modules: a batch
            routed to every expert).
        exclude: parameters not to consider (those a structural finder already paired).
        structural: pairs found before, listed in the report (their names are not reused).

    Returns:
        A :class:`DiscoveryReport`; its ``traced`` pairs are the ones found here.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` has an unsupported type.
        RuntimeError: the forward pass on ``example_inputs`` failed (the model's error is chained).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    structural = list(structural)
    skip = {id(t) for t in exclude} | {id(t) for p in structural for t in (p.A, p.B)}
    names, params = [], []
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter) or p.dim() < 2 or id(p) in skip:
            continue
        if not (p.is_floating_point() or p.is_complex()):
            continue
        names.append(name)
        params.append(p)
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    known = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    # every trainable parameter (1-D ones, the structural pairs' factors, ...) by name: a gate or a
    # bias between two candidate factors is verified at a perturbed value, not at its init
    others = {id(p): name for name, p in model.named_parameters()
              if p.requires_grad and (p.is_floating_point() or p.is_complex())}
    watch = {id(t) for p in structural for t in (p.A, p.B)}

    training = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        # the flag, not model.eval(): some LoRAs override train() to merge B A into the base
        # weight (loralib's merge_weights), which would hide the pair and change the weights
        for m in training:
            m.training = False
        mode = ProposalMode(params, known, others, watch)
        run = _Runner(model, args, kwargs, names)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=run.devices):
                torch.manual_seed(_SEED)
                with mode:
                    model(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(_forward_failed(model, args, kwargs, err)) from err
        candidates, found = _verify(mode, params, names, run, model) if trainable else ([], [])
    finally:
        for m, flag in training.items():
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)

    taken = {p.name for p in structural}
    traced = _unique_names(found, taken)
    renamed = {id(old): new for (_, _, old), new in zip(found, traced)}
    candidates = [dataclasses.replace(c, pair=renamed[id(c.pair)]) if c.pair is not None else c for c in candidates]
    in_pair = {id(t) for p in traced for t in (p.A, p.B)}
    unpaired = {}
    for i in trainable:
        if id(params[i]) not in in_pair:
            unpaired[names[i]] = _why_unpaired(i, names[i], mode, candidates)
    unreached = [p.name for p in structural if id(p.A) not in mode.reached or id(p.B) not in mode.reached]
    return DiscoveryReport(
        pairs=structural + traced, structural=structural, traced=traced,
        considered=[names[i] for i in trainable], candidates=candidates, unpaired=unpaired, traced_run=True,
        unreached=unreached,
    )


def _forward_failed(model: nn.Module, args: tuple, kwargs: dict, err: Exception) -> str:
    """The error for example_inputs the model cannot run, with the tuple-unpacking hint where a
    tuple was spread over more positional arguments than ``forward`` takes."""
    hint = ""
    if len(args) > 1 and isinstance(err, TypeError) and "positional argument" in str(err):
        hint = (f". example_inputs given as a tuple or list are unpacked into {len(args)} positional arguments; "
                "if forward takes the tuple itself as one argument, wrap it: example_inputs=((x, mask),)")
    return (f"traced discovery could not run {type(model).__name__}.forward on example_inputs: "
            f"{type(err).__name__}: {err}{hint}")


def _why_unpaired(i: int, name: str, mode: ProposalMode, candidates: list[Candidate]) -> str:
    mine = [c for c in candidates if name in (c.A, c.B)]
    if mine:
        return "every proposal with it was rejected (see above)"
    if i not in mode.seen:
        return (
            f"{_UNUSED} on example_inputs (an MoE expert the inputs do not route to, a disabled adapter, "
            "or a wrapper its parent module bypasses)"
        )
    if i not in mode.used:
        return "used, but never as the weight of a matmul, linear, conv or embedding"
    return (
        "no other trainable parameter meets it as the other factor of a product (its input and output "
        "connect to frozen weights or activations only)"
    )


def _verify(mode: ProposalMode, params: list[Tensor], names: list[str], run: _Runner, model: nn.Module):
    # one proposal per unordered pair; the first sighting sets the roles
    groups: dict[frozenset, list[Sighting]] = {}
    for s in mode.sightings:
        groups.setdefault(frozenset((s.a, s.b)), []).append(s)
    proposals = []  # (first sighting, hypotheses, where, between)
    candidates: list[Candidate] = []
    through: dict[tuple[int, int], tuple[str, ...]] = {}  # trainable tensors between, by (a, b)
    for sightings in groups.values():
        s = sightings[0]
        if not (params[s.a].requires_grad or params[s.b].requires_grad):
            continue  # two frozen weights of the base model meeting: not an adapter
        where = ", ".join(dict.fromkeys(f"{x.op} ({x.form})" for x in sightings))
        between = tuple(dict.fromkeys(step for x in sightings for step in x.steps))
        via = tuple(dict.fromkeys(n for x in sightings for n in x.via if n not in (names[s.a], names[s.b])))
        through[(s.a, s.b)] = through[(s.b, s.a)] = via
        frozen = [names[i] for i in (s.a, s.b) if not params[i].requires_grad]
        if frozen and between:
            continue  # a frozen weight, a norm, then an adapter: the usual model, not a LoRA-FA pair
        if frozen:
            candidates.append(Candidate(names[s.a], names[s.b], where, between, False,
                                        f"{frozen[0]} is frozen (requires_grad=False): refactoring would change it"))
            continue
        hyps: list[_Hypothesis] = []
        for x in sightings:
            for swap in (False, True) if x.form == "product" else (False,):
                hyps += [h for h in _hypotheses(x, params, swap) if h not in hyps]
        if not hyps:
            candidates.append(Candidate(
                names[s.a], names[s.b], where, between, False,
                f"no layout fits: shapes {tuple(params[s.a].shape)} and {tuple(params[s.b].shape)} with rank "
                f"{s.r} (reflora.pairs supports 2-D factors, transposed, conv kernels with a 1x1 B, and "
                "experts stacked as PEFT stacks them)",
            ))
            continue
        proposals.append((s, hyps, where, between))
    if not proposals:
        return candidates, []

    g = torch.Generator().manual_seed(_SEED)
    involved = sorted({i for s, hyps, _, _ in proposals for h in hyps for i in (h.a, h.b)})
    values = {i: _random_like(params[i], g) for i in involved}
    # every other trainable parameter at a perturbed value too: a gate initialised to ones or a
    # zero bias between the factors is neutral now, but not once training moves it
    factors = {names[i] for i in involved}
    run.fixed = {n: _perturbed(p, g) for n, p in model.named_parameters()
                 if p.requires_grad and (p.is_floating_point() or p.is_complex()) and n not in factors}

    def rejected(s: Sighting, where: str, between: tuple, reason: str, a: int | None = None, b: int | None = None):
        a, b = (s.a, s.b) if a is None else (a, b)
        via = through.get((a, b), ())
        if via:
            reason = (f"the product passes through the trainable {', '.join(via)} between the factors; a "
                      f"refactor is exact only while that stays neutral, which training does not keep (checked "
                      f"perturbed: {reason})")
        return Candidate(names[a], names[b], where, between, False, reason, through=via)
    # 1. first-order screen, every hypothesis of every proposal from one backward pass
    leaves = {i: v.detach().requires_grad_(True) for i, v in values.items()}
    with torch.enable_grad():
        out = _leaves(run(leaves))
        if not out:
            raise RuntimeError("traced discovery needs a model output holding floating-point tensors")
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in out)
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {i: gr for i, gr in zip(leaves, got) if gr is not None}
    dtype = max((t.dtype for t in [*out, *values.values()] if t.is_floating_point()), key=lambda d: torch.finfo(d).eps)
    rtol, gtol = _RTOL.get(dtype, 1e-5), _GTOL.get(dtype, 1e-3)

    chosen: list[tuple[Sighting, _Hypothesis, str, tuple]] = []
    for s, hyps, where, between in proposals:
        errors = [(h, _identity_error(h, values, grads)) for h in hyps]
        if all(e is None for _, e in errors):
            candidates.append(rejected(s, where, between,
                                       "no effect on the outputs for these example inputs (no gradient reaches it)"))
            continue
        ok = [h for h, e in errors if e is not None and e <= gtol]
        if ok:
            chosen.append((s, ok[0], where, between))
            continue
        best = min(e for _, e in errors if e is not None)
        candidates.append(rejected(
            s, where, between,
            f"the output depends on them through more than B A: an infinitesimal refactor changes it "
            f"(relative {best:.2g} > {gtol:g} in A G_A^T = G_B^T B, best of {len(hyps)} layout(s))",
        ))

    # 2. a factor may belong to one pair only
    count: dict[int, list[int]] = {}
    for k, (_, h, _, _) in enumerate(chosen):
        for i in (h.a, h.b):
            count.setdefault(i, []).append(k)
    clash = {k for ks in count.values() if len(ks) > 1 for k in ks}
    for k in sorted(clash):
        s, h, where, between = chosen[k]
        shared = [names[i] for i in (h.a, h.b) if len(count[i]) > 1]
        candidates.append(rejected(s, where, between, f"{shared[0]} is also a factor of another proposal; each "
                                   "factor may belong to one pair only", h.a, h.b))
    chosen = [c for k, c in enumerate(chosen) if k not in clash]

    # 3. the joint refactor, bisected on failure
    with torch.no_grad():
        ref = [t.detach() for t in _leaves(run(values))]
        if not all(bool(torch.isfinite(t).all()) for t in ref):
            raise RuntimeError("traced discovery: the model's outputs are not finite with random adapter values")
        verdicts: dict[int, float] = {}

        def check(ks: list[int]) -> None:
            err = _rel_error(_leaves(run(_refactored(values, [chosen[k][1] for k in ks], g))), ref)
            if err <= rtol:
                verdicts.update((k, err) for k in ks)
            elif len(ks) == 1:
                verdicts[ks[0]] = err
            else:
                check(ks[: len(ks) // 2])
                check(ks[len(ks) // 2:])

        if chosen:
            check(list(range(len(chosen))))
    found = []
    for k, (s, h, where, between) in enumerate(chosen):
        err = verdicts[k]
        if err > rtol:
            candidates.append(rejected(s, where, between, f"a random refactor changed the outputs by {err:.2g} "
                                       f"(relative; tolerance {rtol:g})", h.a, h.b))
            continue
        pair = LoRAPair("", params[h.a], params[h.b], h.layout, experts=h.experts)
        found.append((names[h.a], names[h.b], pair))
        candidates.append(Candidate(names[h.a], names[h.b], where, between, True,
                                    f"verified: a random refactor changed the outputs by {err:.1g} (relative); "
                                    f"layout {h.layout}" + (f", {h.experts} experts" if h.experts > 1 else ""),
                                    pair))
    order = {id(p): i for i, p in enumerate(params)}
    found.sort(key=lambda f: order[id(f[2].A)])
    return candidates, found
