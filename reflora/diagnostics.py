"""What RefLoRA sees in each pair: imbalance, conditioning, how far the metric is from plain LoRA.

Per pair, from the Grams ``X = A A^T`` and ``Y = B^T B`` (float64, the same ones the kernel uses):

* ``imbalance``: ``log(||A||_F / ||B||_F) = log(tr X / tr Y) / 2`` (0: balanced in scale; ``inf``
  while ``B = 0``);
* ``cond_AAt``, ``cond_BtB``: condition numbers of ``A A^T`` and ``B^T B`` (``inf`` when singular);
* ``S_deviation``: ``||S - I||_F / sqrt(r)`` for the variant's metric ``S`` (``(p^2 - 1)`` in
  magnitude for RefLoRA-S): 0 means RefLoRA would do exactly what plain LoRA does;
* ``sigma_max``, ``sigma_min``: the extreme singular values of ``B A`` (``sigma_min`` is 0 when
  ``r > min(m, n)`` or a direction is dead).

:func:`pair_stats` computes them for a stack of Grams (pure, batched, no host sync); a handle
made with ``attach(..., diagnostics_interval=k)`` records them every ``k`` optimizer steps from
the Grams of that step and keeps them as tensors until :meth:`reflora.RefLoRAHandle.diagnostics`
reads them; :func:`diagnose` computes them for any pairs now (plain LoRA included, which is how
``reflora bench`` plots LoRA's imbalance against RefLoRA's); :func:`summarize` reduces them to a
few scalars for a logger.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor

from reflora._kernels import metric, metric_kernel, scalar_kernel
from reflora._linalg import live_basis
from reflora.adapters import as_pairs
from reflora.config import RefLoRAConfig, check_variant, default_eps
from reflora.distributed import is_dtensor
from reflora.pairs import LoRAPair
from reflora.step import gram_stack, group_pairs

__all__ = ["STATS", "Recorder", "diagnose", "group_stats", "pair_stats", "rows_in_order", "summarize"]

STATS = ("imbalance", "cond_AAt", "cond_BtB", "S_deviation", "sigma_max", "sigma_min")


def _cond(lam: Tensor) -> Tensor:
    lo, hi = lam[..., 0], lam[..., -1]
    return torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(lam.dtype).tiny), math.inf)


def pair_stats(X: Tensor, Y: Tensor, variant: str = "full", eps: float | None = None) -> dict[str, Tensor]:
    """The diagnostics of a stack of pairs from their Grams ``(..., r, r)``: ``{stat: (...)}``.

    ``variant`` picks the metric ``S`` of ``S_deviation`` (the full ``S`` or RefLoRA-S's
    ``p^2 I``). Pure and batched: no host sync, no branch on values.
    """
    variant = check_variant(variant)
    eps = default_eps() if eps is None else eps
    r = X.shape[-1]
    tx = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    ty = Y.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam_x = torch.linalg.eigvalsh(X).clamp_min(0.0)
    lam_y = torch.linalg.eigvalsh(Y).clamp_min(0.0)
    _, sig2, _, _ = live_basis(X, Y, eps)
    if variant == "scalar":
        p2, _ = metric(*scalar_kernel(tx, ty))
        dev = (p2[..., 0, 0] - 1.0).abs()
    else:
        S, _ = metric_kernel(X, Y, eps)
        eye = torch.eye(r, dtype=S.dtype, device=S.device)
        dev = torch.linalg.matrix_norm(S - eye) / math.sqrt(r)
    return {
        "imbalance": 0.5 * (tx.log() - ty.log()),
        "cond_AAt": _cond(lam_x),
        "cond_BtB": _cond(lam_y),
        "S_deviation": dev,
        "sigma_max": sig2[..., -1].sqrt(),
        "sigma_min": sig2[..., 0].sqrt(),
    }


def _rows(names: list[str], experts: list[int], stats: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """``{pair name: {stat: float}}`` from stacked stats (one host sync); an expert stack's entries
    are named ``name[e]``."""
    host = {k: v.detach().cpu().tolist() for k, v in stats.items()}
    out: dict[str, dict[str, float]] = {}
    for j, (name, E) in enumerate(zip(names, experts)):
        if E == 1:
            out[name] = {k: float(v[j]) for k, v in host.items()}
        else:
            for e in range(E):
                out[f"{name}[{e}]"] = {k: float(v[j][e]) for k, v in host.items()}
    return out


def diagnose(pairs: Any, variant: str = "full", eps: float | None = None) -> dict[str, dict[str, float]]:
    """:func:`pair_stats` of ``pairs`` as they are now: ``{pair name: {stat: float}}``.

    Args:
        pairs: an ``nn.Module`` (pairs found by :func:`reflora.adapters.find_pairs`), or an
            iterable of ``(A, B)`` tuples / :class:`~reflora.LoRAPair` objects.
        variant: whose metric ``S_deviation`` measures (``"full"`` or ``"scalar"``).
        eps: dead-direction threshold of the metric (``None``: the default, 1.4e-14).
    """
    pair_list = as_pairs(pairs)
    if any(is_dtensor(p.A) or is_dtensor(p.B) for p in pair_list):
        raise ValueError(
            "diagnose() takes unsharded pairs; these are FSDP2 / DTensor shards. Use "
            "reflora.attach(..., diagnostics_interval=k) and handle.diagnostics(), which sums the "
            "shards' Grams over the ranks"
        )
    groups = [[pair_list[i] for i in g] for g in group_pairs(pair_list)]
    with torch.no_grad():
        return rows_in_order(pair_list, groups, group_stats(groups, variant, eps))


def rows_in_order(pairs: list, groups: list[list], stats: list[dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """``{pair name: {stat: float}}`` in the order of ``pairs`` from per-group stacked stats."""
    rows: dict[str, dict[str, float]] = {}
    for group, st in zip(groups, stats):
        rows.update(_rows([p.name for p in group], [p.experts for p in group], st))
    order = []
    for p in pairs:
        order += [p.name] if p.experts == 1 else [f"{p.name}[{e}]" for e in range(p.experts)]
    return {k: rows[k] for k in order if k in rows}


def summarize(rows: dict[str, dict[str, float]], prefix: str = "reflora/") -> dict[str, float]:
    """A few scalars for a logger: mean and max ``|imbalance|``, max condition numbers, mean and
    max ``S_deviation``, the largest ``sigma_max`` and the smallest ``sigma_min`` over pairs."""
    if not rows:
        return {}

    def col(k: str) -> list[float]:
        return [r[k] for r in rows.values()]

    imb = [abs(v) for v in col("imbalance")]
    dev = col("S_deviation")
    return {
        f"{prefix}imbalance_abs_mean": sum(imb) / len(imb),
        f"{prefix}imbalance_abs_max": max(imb),
        f"{prefix}cond_AAt_max": max(col("cond_AAt")),
        f"{prefix}cond_BtB_max": max(col("cond_BtB")),
        f"{prefix}S_deviation_mean": sum(dev) / len(dev),
        f"{prefix}S_deviation_max": max(dev),
        f"{prefix}sigma_max": max(col("sigma_max")),
        f"{prefix}sigma_min": min(col("sigma_min")),
    }


def group_stats(pair_groups: Iterable[list], variant: str, eps: float | None) -> list[dict[str, Tensor]]:
    """Per group of same-shape pairs: :func:`pair_stats` (tensors, no host sync), from the Grams of
    the optimizer step's own routine (summed over the ranks for sharded pairs). Call under no_grad."""
    return [pair_stats(*gram_stack(group), variant, eps) for group in pair_groups]



class Recorder:
    """A handle's diagnostics (``attach(..., diagnostics_interval=k)``): every ``k`` eager optimizer
    steps the stats of every pair as the step began, from the Grams the step computes anyway (fresh
    ones for the pairs it computes none for), kept as tensors until :meth:`read`."""

    def __init__(self, pairs: tuple[LoRAPair, ...], groups: list[list[int]]) -> None:
        self.pairs = pairs
        self.groups = groups
        self.latest: tuple[int, list[tuple[list[LoRAPair], dict[str, Tensor]]]] | None = None
        self.parts: list[tuple[list[LoRAPair], dict[str, Tensor]]] | None = None  # during a recording step
        self.traced_steps = False  # a step ran inside torch.compile (it records no diagnostics)

    def begin(self, t: int, cfg: RefLoRAConfig) -> bool:
        """Start step ``t``; whether it records. A parameter-space scalar step rescales the factors
        and computes no Grams: its stats are taken here, before it does."""
        due = cfg.diagnostics_interval > 0 and t % cfg.diagnostics_interval == 0
        self.parts = [] if due else None
        if due and cfg.space == "parameter" and cfg.variant == "scalar" and cfg.active(t):
            groups = [[self.pairs[i] for i in g] for g in self.groups]
            with torch.no_grad():
                self.parts = list(zip(groups, group_stats(groups, cfg.variant, cfg.eps)))
        return due

    def on_grams(self, pairs: list[LoRAPair], X: Tensor, Y: Tensor, eps: float | None) -> None:
        """The step's Grams of a group (full variant): their stats, if this step records."""
        if self.parts is not None:
            self.parts.append((pairs, pair_stats(X, Y, "full", eps)))

    def finish(self, t: int, variant: str, eps: float | None) -> None:
        """Store step ``t``'s stats: the step's own, fresh ones for the pairs it computed none for
        (the scalar variant, cached or warmup steps, pairs without gradients)."""
        parts = self.parts or []
        seen = {id(p) for pairs, _ in parts for p in pairs}
        rest = [[self.pairs[i] for i in g if id(self.pairs[i]) not in seen] for g in self.groups]
        rest = [pairs for pairs in rest if pairs]
        parts += list(zip(rest, group_stats(rest, variant, eps)))
        self.latest = (t, parts)

    def read(self, interval: int) -> dict[str, Any] | None:
        """``{"step": t, "pairs": {name: {stat: float}}}`` of the latest recording (one host sync)."""
        if self.latest is None:
            if interval > 0 and self.traced_steps:
                warnings.warn(
                    "RefLoRA diagnostics: none recorded, and steps ran inside torch.compile, which does not "
                    "record them (only eager optimizer steps do). For the stats of the pairs now, call "
                    "reflora.diagnostics.diagnose(handle.pairs) outside the compiled step",
                    stacklevel=3,
                )
            return None
        t, parts = self.latest
        return {"step": t, "pairs": rows_in_order(list(self.pairs), [p for p, _ in parts], [s for _, s in parts])}
