"""reflora.runner, one step of a handle: counting optimizer steps (not micro-batches), GradScaler
skips with fused / foreach / capturable optimizers (neither acting nor counting, still-scaled
gradients), pairs without gradients, and the pair that never gets one."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import reflora
from reflora import attach

from attach_helpers import LoRANet, MODE_IDS, MODES, setup, train


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(net: LoRANet, device: str) -> LoRANet:
    net.to(device)
    for attr in ("W0", "targets", "X"):
        setattr(net, attr, [t.to(device) for t in getattr(net, attr)])
    return net


def _snapshot(net: LoRANet, opt) -> tuple[list[torch.Tensor], list[dict]]:
    params = [p.detach().clone() for p in net.parameters()]
    state = [
        {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
        for p in net.parameters()
    ]
    return params, state


def _assert_same(snap, net: LoRANet, opt) -> None:
    params, state = snap
    for p, q in zip(params, net.parameters()):
        assert torch.equal(p, q.detach())
    for s, p in zip(state, net.parameters()):
        now = opt.state[p]
        assert s.keys() == now.keys()
        for k, v in s.items():
            assert torch.equal(v, now[k]) if isinstance(v, torch.Tensor) else v == now[k], k


AMP_OPTIMIZERS = {
    "Adam": lambda ps, **kw: torch.optim.Adam(ps, lr=2e-2, **kw),
    "AdamW": lambda ps, **kw: torch.optim.AdamW(ps, lr=2e-2, weight_decay=0.0, **kw),
    "SGD": lambda ps, **kw: torch.optim.SGD(ps, lr=0.3, momentum=0.9, **kw),
}


IMPLS = ["fused", "foreach", "capturable"]


def _amp_setup(opt_name: str, impl: str, variant: str, space: str, device: str, seed: int = 0, **kw):
    if impl == "capturable" and opt_name == "SGD":
        pytest.skip("torch.optim.SGD has no capturable implementation")
    if impl == "capturable":
        probe = nn.Parameter(torch.zeros(2, device=device))
        probe.grad = torch.ones_like(probe)
        try:
            torch.optim.Adam([probe], capturable=True).step()
        except (AssertionError, RuntimeError) as exc:
            pytest.skip(f"torch refuses capturable=True on {device}: {str(exc)[:100]}")
    net = _on(LoRANet(seed=seed), device)
    opt = AMP_OPTIMIZERS[opt_name](list(net.parameters()), **{impl: True})
    return net, opt, attach(opt, net.pairs(), variant=variant, space=space, **kw)


def _scaled_step(net: LoRANet, opt, scaler, *, poison: bool = False) -> None:
    opt.zero_grad()
    scaler.scale(net.loss()).backward()
    if poison:
        net.A[0].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt_name", list(AMP_OPTIMIZERS))
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_grad_scaler_skipped_step_neither_acts_nor_counts(opt_name, impl, variant, space, device) -> None:
    net, opt, handle = _amp_setup(opt_name, impl, variant, space, device, interval=2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    for _ in range(3):
        _scaled_step(net, opt, scaler)
    assert handle.step_count == 3
    snap = _snapshot(net, opt)
    if impl == "fused":
        # the scaler hands fused optimizers found_inf as an attribute and steps them: the hook
        # must see it and leave even the (still scaled) gradients alone
        assert opt._step_supports_amp_scaling
        opt.zero_grad()
        scaler.scale(net.loss()).backward()
        net.A[0].grad[0, 0] = float("inf")
        grads = [p.grad.clone() for p in net.parameters()]
        scaler.step(opt)
        scaler.update()
        for g, p in zip(grads, net.parameters()):
            assert torch.equal(g, p.grad)
    else:
        _scaled_step(net, opt, scaler, poison=True)
    _assert_same(snap, net, opt)
    assert handle.step_count == 3
    _scaled_step(net, opt, scaler)  # a finite step acts and counts again
    assert handle.step_count == 4
    assert not all(torch.equal(p, q) for p, q in zip(snap[0], net.parameters()))


@pytest.mark.parametrize("opt_name", list(AMP_OPTIMIZERS))
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_fused_under_grad_scaler_matches_the_unscaled_run(opt_name, variant, space) -> None:
    """The hook sees gradients still scaled by grad_scale: its maps are linear, so the fused
    kernel's unscaling afterwards gives the unscaled run (a skipped inf step in between)."""
    net, opt, _ = _amp_setup(opt_name, "fused", variant, space, "cpu", interval=2)
    ref, ref_opt, _ = _amp_setup(opt_name, "fused", variant, space, "cpu", interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for step in range(8):
        if step == 3:
            _scaled_step(net, opt, scaler, poison=True)
        _scaled_step(net, opt, scaler)
    train(ref, ref_opt, 8)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_found_inf_keyword_of_step_is_still_honoured() -> None:
    class Amp(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-2})

        @torch.no_grad()
        def step(self, closure=None, found_inf=None):
            if found_inf is not None and found_inf.item():
                return
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])

    net = LoRANet()
    opt = Amp(net.parameters())
    handle = attach(opt, net.pairs(), space="gradient")
    train(net, opt, 2)
    opt.zero_grad()
    net.loss().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.step(found_inf=torch.tensor(1.0))
    assert handle.step_count == 2
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    opt.step(found_inf=torch.tensor(0.0))
    assert handle.step_count == 3


def test_counts_optimizer_steps_not_micro_batches() -> None:
    net, opt, handle = setup("SGD", "full", "parameter", warmup_steps=3)
    for _ in range(5):
        opt.zero_grad()
        for _ in range(4):  # gradient accumulation
            (net.loss() / 4).backward()
        opt.step()
    assert handle.step_count == 5


def test_grad_scaler_skipped_step_is_not_counted() -> None:
    net, opt, handle = setup("Adam", "full", "parameter")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    train(net, opt, 2)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    scaler.scale(net.loss()).backward()
    net.A[0].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert handle.step_count == 2
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    opt.zero_grad()
    scaler.scale(net.loss()).backward()
    scaler.step(opt)
    scaler.update()
    assert handle.step_count == 3


def test_pairs_without_gradients_are_skipped() -> None:
    net = LoRANet()
    extra_A = nn.Parameter(torch.randn(4, 8))
    extra_B = nn.Parameter(torch.randn(8, 4))  # never used in the loss: grads stay None
    opt = torch.optim.Adam([*net.parameters(), extra_A, extra_B], lr=1e-2)
    handle = attach(opt, [*net.pairs(), (extra_A, extra_B)], space="parameter")
    snapshot = extra_A.detach().clone()
    train(net, opt, 3)
    assert handle.step_count == 3 and torch.equal(extra_A, snapshot)


def test_a_pair_without_gradients_after_the_first_steps_is_named_once() -> None:
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    handle = attach(opt, net.pairs())
    unused = net.pairs()[2]
    with pytest.warns(reflora.UnusedPairWarning, match=r"'pair2': a factor has had no gradient in the first 3"):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            sum(0.5 * o.square().mean() for o in net.outputs()[:2]).backward()
            opt.step()
    assert unused[0].grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step()
    assert handle.step_count == 6
