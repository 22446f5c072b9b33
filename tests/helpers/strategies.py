"""Hypothesis strategies for low-rank factor pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

MAX_COND = {torch.float64: 1e8, torch.float32: 1e4, torch.bfloat16: 1e2, torch.float16: 1e2}


@dataclass(frozen=True)
class PairSpec:
    """Everything needed to build one (batched) factor pair deterministically."""

    batch: tuple[int, ...]
    r: int
    m: int
    n: int
    cond_a: float
    cond_b: float
    imbalance: float  # ||A|| / ||B||
    dtype: torch.dtype
    seed: int


def conditioned(shape: tuple[int, ...], cond: float, gen: torch.Generator) -> torch.Tensor:
    """A float64 matrix batch with singular values log-spaced from 1 down to 1/cond."""
    rows, cols = shape[-2:]
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    k = min(rows, cols)
    s = torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return (u * s) @ vh


def build(spec: PairSpec, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.seed)
    A = conditioned((*spec.batch, spec.r, spec.m), spec.cond_a, gen)
    B = conditioned((*spec.batch, spec.n, spec.r), spec.cond_b, gen)
    A = A * spec.imbalance**0.5
    B = B / spec.imbalance**0.5
    return A.to(device=device, dtype=spec.dtype), B.to(device=device, dtype=spec.dtype)


@st.composite
def pair_specs(
    draw,
    dtypes=(torch.float32, torch.float64),
    max_r: int = 64,
    max_dim: int = 512,
    full_rank: bool = False,
    max_cond: float | None = None,
    max_imbalance: float = 1e4,
    batch: bool = True,
) -> PairSpec:
    dtype = draw(st.sampled_from(dtypes))
    r = draw(st.integers(1, max_r))
    lo = r if full_rank else 1
    m = draw(st.integers(lo, max(lo, max_dim)))
    n = draw(st.integers(lo, max(lo, max_dim)))
    bshape = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) if batch else ()
    cmax = MAX_COND[dtype] if max_cond is None else min(max_cond, MAX_COND[dtype])
    log_c = torch.log10(torch.tensor(cmax)).item()
    cond_a = 10 ** draw(st.floats(0.0, log_c))
    cond_b = 10 ** draw(st.floats(0.0, log_c))
    lim = torch.log10(torch.tensor(max_imbalance)).item()
    imbalance = 10 ** draw(st.floats(-lim, lim))
    seed = draw(st.integers(0, 2**31 - 1))
    return PairSpec(bshape, r, m, n, cond_a, cond_b, imbalance, dtype, seed)
