"""torch.compile(fullgraph=True) of the core: no graph break, compiled == eager, no recompile."""

from __future__ import annotations

import pytest
import torch

from reflora.functional import precondition, refactor

pytestmark = pytest.mark.compile


def _inputs(seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    A = (5 * torch.randn(3, 8, 48, generator=g)).to(device)
    B = (0.1 * torch.randn(3, 40, 8, generator=g)).to(device)
    B[1] = 0.0  # a degenerate pair in the same batch
    gA, gB = torch.randn(A.shape, generator=g).to(device), torch.randn(B.shape, generator=g).to(device)
    return A, B, gA, gB


@pytest.mark.parametrize("variant", ["full", "scalar"])
def test_compiled_matches_eager_without_recompiling(variant, device) -> None:
    torch._dynamo.reset()

    def step(A, B, gA, gB):
        out = refactor(A, B, (gA, gB), variant=variant)
        pre = precondition(A, B, gA, gB, variant=variant)
        return (*out, *pre)

    compiled = torch.compile(step, fullgraph=True)
    A, B, gA, gB = _inputs(0, device)
    eager = step(A, B, gA, gB)
    got = compiled(A, B, gA, gB)
    for e, c in zip(eager, got):
        scale = e.abs().max().clamp_min(1.0)
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-4 * float(scale))
    # new values, same shapes: must reuse the compiled graph
    A2, B2, gA2, gB2 = _inputs(1, device)
    with torch.compiler.set_stance("fail_on_recompile"):
        got2 = compiled(A2, B2, gA2, gB2)
    eager2 = step(A2, B2, gA2, gB2)
    assert torch.allclose(got2[1] @ got2[0], eager2[1] @ eager2[0], rtol=1e-4, atol=1e-4)
