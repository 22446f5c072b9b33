"""CUDA-only checks (skipped without a GPU; run by benchmarks/tools/gpu_check.sh): the hook makes no
host sync with the eigh-free solver, and a compiled step with CUDA graphs works with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reflora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MODES = [("full", "gradient"), ("full", "parameter"), ("scalar", "gradient"), ("scalar", "parameter")]
IDS = [f"{v}-{s}" for v, s in MODES]


def _pairs(k: int = 4, r: int = 4, m: int = 48, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (nn.Parameter((torch.randn(r, m, generator=g) / m**0.5).cuda()),
         nn.Parameter((0.1 * torch.randn(n, r, generator=g)).cuda()))
        for _ in range(k)
    ]


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("interval", [1, 2])
def test_hook_makes_no_host_sync_cuda(mode, interval) -> None:
    """torch.cuda.set_sync_debug_mode("error"): no .item(), no data-dependent branch, no blocking copy."""
    pairs = _pairs()
    params = [p for ab in pairs for p in ab]
    opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)
    handle = reflora.attach(opt, pairs, variant=mode[0], space=mode[1], solver="newton_schulz", interval=interval)
    x = torch.randn(16, 48, device="cuda")
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        sum((x @ A.T @ B.T).square().mean() for A, B in pairs).backward()
        if step == 0:
            opt.step()  # the optimizer creates its state (not ours to judge)
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle._pre_hook(opt, (), {})
            handle._post_hook(opt, (), {})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with torch.no_grad():
            for p in params:
                assert torch.isfinite(p).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_cuda_graphs_reduce_overhead_with_newton_schulz_cuda(space) -> None:
    """A train step compiled with mode="reduce-overhead" (CUDA graphs) matches eager."""
    torch._dynamo.reset()

    def make():
        pairs = _pairs(seed=1)
        params = [p for ab in pairs for p in ab]
        opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)
        reflora.attach(opt, pairs, space=space, solver="newton_schulz")
        return pairs, opt

    x = torch.randn(16, 48, device="cuda", generator=None)

    def train_step(pairs, opt):
        opt.zero_grad(set_to_none=True)
        loss = sum((x @ A.T @ B.T - 1.0).square().mean() for A, B in pairs)
        loss.backward()
        opt.step()
        return loss.detach()

    eager_pairs, eager_opt = make()
    graph_pairs, graph_opt = make()
    compiled = torch.compile(train_step, mode="reduce-overhead")
    for _ in range(6):
        train_step(eager_pairs, eager_opt)
        compiled(graph_pairs, graph_opt)
    torch.cuda.synchronize()
    for (A1, B1), (A2, B2) in zip(eager_pairs, graph_pairs):
        assert torch.allclose(B1 @ A1, B2 @ A2, rtol=1e-4, atol=1e-5)
