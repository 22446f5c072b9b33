"""reflora.cache: gradient space with interval > 1 applies the cached S between refreshes."""

from __future__ import annotations

import torch
from torch import nn

import reflora
from reflora import attach


def test_interval_caches_the_metric_between_refreshes() -> None:
    g = torch.Generator().manual_seed(5)
    A = nn.Parameter(torch.randn(3, 10, generator=g, dtype=torch.float64))
    B = nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64))
    target = torch.randn(6, 10, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD([A, B], lr=1e-2)
    handle = attach(opt, [(A, B)], interval=3)
    metrics = []
    for _ in range(4):
        metrics.append(reflora.preconditioner(A.detach(), B.detach(), resolved=handle.resolved))
        opt.zero_grad()
        (0.5 * (B @ A - target).square().sum()).backward()
        gA = A.grad.clone()
        a0 = A.detach().clone()
        opt.step()
        S, S_inv = metrics[3 * (len(metrics) - 1 >= 3)]
        assert torch.allclose((a0 - A.detach()) / 1e-2, S_inv @ gA)
    assert "cache" in handle.state_dict() and len(handle.state_dict()["cache"]) == 1
