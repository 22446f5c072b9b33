"""reflora.optimizers: the space space='auto' picks per optimizer family, its fallbacks (with one
notice for an unregistered optimizer), DeepSpeed wrappers, and one place that decides it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import reflora
from reflora import attach
from reflora.optimizers import default_space

from attach_helpers import LoRANet, LR, OPTIMIZERS, train


class _Unregistered(torch.optim.Optimizer):  # plain SGD, no transport registered
    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class _MyAdamW(torch.optim.AdamW):  # a subclass follows its registered base class
    pass


AUTO = [
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-2), "parameter"),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-2), "parameter"),
    ("NAdam", lambda ps: torch.optim.NAdam(ps, lr=1e-2), "parameter"),
    ("RAdam", lambda ps: torch.optim.RAdam(ps, lr=1e-2), "parameter"),
    ("RMSprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "parameter"),
    ("Adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2), "parameter"),
    ("AdamW subclass", lambda ps: _MyAdamW(ps, lr=1e-2), "parameter"),
    ("SGD momentum", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), "gradient"),
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=1e-2), "gradient"),
    ("Adamax (unregistered)", lambda ps: torch.optim.Adamax(ps, lr=1e-2), "gradient"),
    ("own optimizer (unregistered)", lambda ps: _Unregistered(ps), "gradient"),
]
if hasattr(torch.optim, "Adafactor"):
    AUTO.append(("Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2), "parameter"))


@pytest.mark.parametrize("make, want", [a[1:] for a in AUTO], ids=[a[0] for a in AUTO])
def test_auto_space_per_optimizer_family(make, want) -> None:
    net = LoRANet()
    opt = make(list(net.parameters()))
    assert reflora.default_space(opt) == want
    handle = attach(opt, net.pairs())  # space="auto" is the default
    assert handle.space == want and f"space={want!r}" in repr(handle)
    assert handle.state_dict()["space"] == want
    losses = train(net, opt, 3)
    assert handle.step_count == 3 and torch.isfinite(torch.tensor(losses)).all()


def test_auto_space_with_transformers_adafactor() -> None:
    transformers = pytest.importorskip("transformers")
    net = LoRANet()
    opt = transformers.optimization.Adafactor(list(net.parameters()), lr=1e-2, relative_step=False)
    assert reflora.default_space(opt) == "parameter"
    assert attach(opt, net.pairs()).space == "parameter"


@pytest.mark.parametrize("opt_name, space", [("AdamW", "parameter"), ("SGD", "gradient")])
def test_auto_space_trains_as_the_explicit_space(opt_name, space) -> None:
    net, ref = LoRANet(), LoRANet()
    opt = OPTIMIZERS[opt_name](list(net.parameters()), LR[opt_name])
    ref_opt = OPTIMIZERS[opt_name](list(ref.parameters()), LR[opt_name])
    assert attach(opt, net.pairs()).space == space
    attach(ref_opt, ref.pairs(), space=space)
    train(net, opt, 4)
    train(ref, ref_opt, 4)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))


def test_auto_space_falls_back_where_parameter_space_would_raise() -> None:
    g = torch.Generator().manual_seed(0)
    # newton_schulz refuses full-variant parameter space on pairs of rank above the layer's size
    A, B = nn.Parameter(torch.randn(8, 32, generator=g)), nn.Parameter(torch.randn(3, 8, generator=g))
    opt = torch.optim.AdamW([A, B], lr=1e-2)
    with pytest.raises(ValueError, match="newton_schulz"):
        attach(opt, [(A, B)], space="parameter", solver="newton_schulz", rank_above_size="act")
    handle = attach(opt, [(A, B)], solver="newton_schulz", rank_above_size="act")
    assert handle.space == "gradient"
    handle.remove()
    # the scalar variant and the eigh solver have no such rule: parameter space
    assert attach(opt, [(A, B)], variant="scalar", solver="newton_schulz", rank_above_size="act").space == "parameter"

    # state the transport cannot move: a warning, then gradient space
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    train(net, opt, 1)
    A0 = net.pairs()[0][0]
    opt.state[A0]["extra"] = torch.zeros(3)
    with pytest.raises(KeyError, match="extra"):
        attach(opt, net.pairs(), space="parameter")
    with pytest.warns(UserWarning, match=r"space='auto'.*cannot be moved.*using space='gradient'"):
        handle = attach(opt, net.pairs())
    assert handle.space == "gradient"


def test_auto_space_under_a_deepspeed_wrapper() -> None:
    # DeepSpeed ZeRO is detected by the wrapper's module; parameter space is unsupported there
    inner = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-2)
    Wrapper = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    wrapper = Wrapper()
    wrapper.optimizer = inner
    assert reflora.default_space(inner) == "parameter"
    assert reflora.default_space(wrapper) == "gradient"


def test_auto_falls_back_to_gradient_space_with_one_notice_for_an_unregistered_optimizer() -> None:
    net = LoRANet()
    opt = torch.optim.Adamax(list(net.parameters()), lr=1e-2)
    with pytest.warns(reflora.GradientSpaceFallbackWarning, match=r"register_state_transport\(Adamax"):
        handle = attach(opt, net.pairs())
    assert handle.space == "gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(net, opt, 3)  # once per handle: nothing more while training
        handle.remove()
        attach(opt, net.pairs(), space="gradient")  # explicit: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=reflora.GradientSpaceFallbackWarning)
        net3 = LoRANet()
        attach(torch.optim.Adamax(list(net3.parameters()), lr=1e-2), net3.pairs())
        net4 = LoRANet()  # a registered SGD-like optimizer picks gradient space by design: no notice
        attach(torch.optim.SGD(list(net4.parameters()), lr=1e-2), net4.pairs())


def test_space_resolution_lives_in_one_place():
    w = nn.Parameter(torch.zeros(2))
    for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop):
        assert default_space(cls) == default_space(cls([w])) == "parameter"
    assert default_space(torch.optim.SGD) == default_space(torch.optim.SGD([w], lr=0.1)) == "gradient"
    assert reflora.func.adamw(None).space == default_space(torch.optim.AdamW)
    assert reflora.func.sgd(None).space == default_space(torch.optim.SGD)
