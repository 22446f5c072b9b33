"""reflora.step, the step core: the batched products (apply_many: stacked, chunked, transposed
layouts, scalar transforms, gated) and a parameter-space refactor of factors, gradients and
optimizer state equal to the functional core's maps."""

from __future__ import annotations

import pytest
import torch

from reflora import attach

from attach_helpers import LoRANet, LR, OPTIMIZERS, train


@pytest.mark.parametrize("rule", ["square", "keep", "reset"])
@pytest.mark.parametrize("variant", ["full", "scalar"])
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_parameter_step_moves_state_like_the_functional_maps(opt_name, variant, rule) -> None:
    """The hook refactors factors, gradients and optimizer state in one batched product per side
    (spec transports, rules square/keep) or through the transport (reset): both equal the
    functional core's refactor_transform + map_first_moments / map_second_moments."""
    from reflora.functional import apply_transform, map_first_moments, map_second_moments, refactor_transform

    net = LoRANet(dtype=torch.float64)
    opt = OPTIMIZERS[opt_name](list(net.parameters()), LR[opt_name])
    handle = attach(opt, net.pairs(), variant=variant, space="parameter", second_moment=rule)
    train(net, opt, 4)
    opt.zero_grad()
    net.loss().backward()
    snap = [(a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone(),
             {k: v.clone() for k, v in opt.state[a].items()}, {k: v.clone() for k, v in opt.state[b].items()})
            for a, b in net.pairs()]
    handle._pre_hook(opt, (), {})  # the refactor alone, without the optimizer's update
    first = {"AdamW": ["exp_avg"], "SGD": ["momentum_buffer"]}[opt_name]
    second = {"AdamW": ["exp_avg_sq"], "SGD": []}[opt_name]
    for (a, b), (a0, b0, ga, gb, sa, sb) in zip(net.pairs(), snap):
        T = refactor_transform(a0, b0, variant=variant, resolved=handle.resolved)
        want = [*apply_transform(T, a0, b0), *map_first_moments(T, ga, gb)]
        got = [a, b, a.grad, b.grad]
        for key in first:
            want += map_first_moments(T, sa[key], sb[key])
            got += [opt.state[a][key], opt.state[b][key]]
        for key in second:
            want += map_second_moments(T, sa[key], sb[key], rule=rule)
            got += [opt.state[a][key], opt.state[b][key]]
        for w, g in zip(want, got):
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-12 * float(w.abs().max() + 1)), (rule, variant)


@pytest.mark.parametrize("chunk", [1, 3 * 6 * 10, 1 << 17])
@pytest.mark.parametrize("gated", [None, True, False])
def test_apply_many_matches_one_product_per_tensor(monkeypatch, chunk, gated) -> None:
    """``reflora.step.apply_many`` (stacked, chunked, transposed layouts, scalar transforms, a traced
    step's gate) writes exactly ``T x`` / ``x T`` into every tensor, whatever the chunk size."""
    import reflora.step as core

    monkeypatch.setattr(core, "CHUNK_NUMEL", chunk)
    g = torch.Generator().manual_seed(0)
    r = 6
    left_x = [torch.randn(r, 10, generator=g, dtype=torch.float64) for _ in range(7)]
    right_x = [torch.randn(12, r, generator=g, dtype=torch.float64) for _ in range(5)]
    right_t = [torch.randn(r, 9, generator=g, dtype=torch.float64).mT for _ in range(4)]  # a transposed layout
    scal_x = [torch.randn(8, r, generator=g, dtype=torch.float64) for _ in range(3)]
    TL, TR, TT = (torch.randn(n, r, r, generator=g, dtype=torch.float64) for n in (7, 5, 4))
    TS = torch.rand(3, 1, 1, generator=g, dtype=torch.float64) + 0.5
    before = [x.clone() for x in left_x + right_x + right_t + scal_x]
    want = [t @ x for t, x in zip(TL, left_x)] + [x @ t for t, x in zip(TR, right_x)]
    want += [x @ t for t, x in zip(TT, right_t)] + [t * x for t, x in zip(TS, scal_x)]
    gate = None if gated is None else torch.tensor(gated)
    core.apply_many([(left_x[:4], TL[:4]), (left_x[4:], TL[4:]), (scal_x, TS)],
                    [(right_x, TR), (right_t, TT)], gate)
    for got, w, b in zip(left_x + right_x + right_t + scal_x, want, before):
        torch.testing.assert_close(got, b if gated is False else w, rtol=1e-14, atol=1e-14)
