"""``RefLoRAHandle.follow``: an averaged copy of the model (EMA / SWA weights) is refactored with
the factors, so that its own ``B_avg A_avg`` is kept; bad targets are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import reflora


class _Lin(nn.Module):
    def __init__(self, m: int, n: int, r: int, g: torch.Generator) -> None:
        super().__init__()
        # an unbalanced start, so that every refactor moves the factors far
        self.lora_A = nn.Parameter(torch.randn(r, m, generator=g, dtype=torch.float64) * 2.0)
        self.lora_B = nn.Parameter(torch.randn(n, r, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x @ self.lora_A.T @ self.lora_B.T


class _Net(nn.Module):
    def __init__(self, r: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1, self.l2 = _Lin(16, 12, r, g), _Lin(12, 8, r, g)

    def forward(self, x):
        return self.l2(self.l1(x))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)


def _products(model: nn.Module) -> list[torch.Tensor]:
    mods = [m for m in model.modules() if isinstance(m, _Lin)]
    return [(m.lora_B @ m.lora_A).detach().clone() for m in mods]


def _train_with_ema(follow: bool, steps: int = 6, **attach_kw):
    net = _Net()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    handle = reflora.attach(opt, net, **{"space": "parameter", "resolved": 0.0, "warmup_steps": 0, **attach_kw})
    if follow:
        assert handle.follow(ema) == ["l1", "l2"]
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
        ema.update_parameters(net)
    return net, ema, opt, handle


def _refactor_only_step(net, opt) -> None:
    x, y = _data()
    opt.zero_grad()
    (net(x) - y).square().mean().backward()
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()


@pytest.mark.parametrize("variant", ["full", "scalar"])
def test_a_followed_average_keeps_its_product_through_a_refactor(variant) -> None:
    net, ema, opt, _ = _train_with_ema(True, variant=variant)
    before, ema_A = _products(ema), ema.module.l1.lora_A.detach().clone()
    _refactor_only_step(net, opt)
    for got, want in zip(_products(ema), before):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ema.module.l1.lora_A, ema_A), "the refactor did not reach the average"
    # the average moved exactly as the factors did: A_avg' = P^T A_avg with the factors' own P^T
    net2, ema2, opt2, _ = _train_with_ema(True, variant=variant)
    A_before = net2.l1.lora_A.detach().clone()
    _refactor_only_step(net2, opt2)
    left = torch.linalg.lstsq(A_before.T, net2.l1.lora_A.detach().T).solution.T  # P^T = A' A^+
    torch.testing.assert_close(ema2.module.l1.lora_A, left @ ema_A, rtol=1e-8, atol=1e-10)


def test_an_average_that_does_not_follow_drifts() -> None:
    """EMA after a refactor-only step: with follow, the average's product is the one it has when
    no refactor happens (the map commutes with the averaging); without, it mixes two
    factorizations and the product moves: what follow is for."""

    def after(follow: bool, refactor: bool) -> list[torch.Tensor]:
        net, ema, opt, handle = _train_with_ema(follow)
        if not refactor:
            handle.remove()  # the lr-0 step then changes nothing
        _refactor_only_step(net, opt)
        ema.update_parameters(net)
        return _products(ema)

    reference = after(True, refactor=False)
    kept = max(float((a - b).abs().max()) for a, b in zip(after(True, refactor=True), reference))
    drift = max(float((a - b).abs().max()) for a, b in zip(after(False, refactor=True), reference))
    assert kept < 1e-10 and drift > 1e-3, (kept, drift)


def test_gradient_space_has_nothing_to_move() -> None:
    net, ema, opt, _ = _train_with_ema(True, space="gradient")
    before = [p.detach().clone() for p in ema.parameters()]
    _refactor_only_step(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), before))


def test_several_copies_and_pairs_given_as_tuples_follow() -> None:
    net = _Net()
    ema, copy_ = AveragedModel(net), _Net()
    copy_.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    handle = reflora.attach(opt, [(net.l1.lora_A, net.l1.lora_B)], space="parameter", resolved=0.0, warmup_steps=0)
    handle.follow([(ema.module.l1.lora_A, ema.module.l1.lora_B)])  # unnamed: by position
    handle.follow([(copy_.l1.lora_A, copy_.l1.lora_B)])
    before = _products(copy_)[0], _products(ema)[0]
    _refactor_only_step(net, opt)
    torch.testing.assert_close(_products(copy_)[0], before[0])
    torch.testing.assert_close(_products(ema)[0], before[1])
    torch.testing.assert_close(copy_.l1.lora_A, net.l1.lora_A)  # the same map as the factors'
    assert torch.equal(copy_.l2.lora_A, net.l2.lora_A)  # not attached: left alone


def test_bad_targets_are_refused_by_name() -> None:
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    handle = reflora.attach(opt, net, space="parameter")
    with pytest.raises(ValueError, match="one of this handle's own pairs; pass the averaged copy"):
        handle.follow(net)
    with pytest.raises(ValueError, match=r"has shapes \(2, 16\).*must have the attached model's adapters"):
        other = _Net(r=2)
        handle.follow(other)
    with pytest.raises(ValueError, match="no pair matching 'l1'.*pass the averaged copy"):
        handle.follow([(torch.zeros(4, 16, dtype=torch.float64), torch.zeros(12, 4, dtype=torch.float64))])
