"""reflora.transport: a spec kind on state not shaped like its parameter raises before anything
changes, unknown keys name the class, a registered custom transport is used, and Adafactor's
factored moments (torch's and transformers', the latter registered lazily) move exactly for the
scalar variant."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reflora import attach, LoRAPair, UnsupportedOptimizerError
from reflora.transport import get_state_transport, register_state_transport, registered_optimizers
from reflora.transport.adafactor import HFAdafactorTransport

from attach_helpers import LoRANet, train


PARAM_MODES = [("full", "parameter"), ("scalar", "parameter")]


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


class RowMoment(torch.optim.Optimizer):
    """Momentum plus a 1-D (row) second moment: state a kind-spec cannot map."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                m = st.setdefault("m", torch.zeros_like(p))
                m.mul_(0.9).add_(p.grad)
                if p.shape[1] == 24:  # only one of LoRANet's groups gets the 1-D moment
                    v = st.setdefault("v_row", torch.zeros(p.shape[0], dtype=p.dtype))
                    v.mul_(0.9).add_(p.grad.square().mean(1), alpha=0.1)
                    p.addcdiv_(m, v.sqrt().add(1e-8).unsqueeze(1), value=-group["lr"])
                else:
                    p.add_(m, alpha=-group["lr"])


register_state_transport(RowMoment, {"step": "keep", "m": "first", "v_row": "second"})
QUALIFIED = f"{RowMoment.__module__}.RowMoment"


def test_spec_kind_on_non_parameter_shaped_state_raises_before_anything_changes() -> None:
    net = LoRANet()
    opt = RowMoment(net.parameters())
    handle = attach(opt, net.pairs(), variant="full", space="parameter", warmup_steps=0)
    train(net, opt, 1)  # the first refactor finds no state yet; the step creates it
    opt.zero_grad()
    net.loss().backward()
    snap = _snapshot(net, opt)
    grads = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(UnsupportedOptimizerError) as info:
        opt.step()
    msg = str(info.value)
    for part in (QUALIFIED, "'v_row'", "shape (4,)", "(4, 24)", "register_state_transport", "space='gradient'"):
        assert part in msg, (part, msg)
    # the first group (no 1-D state) is checked fine but must not have been refactored either
    _assert_same(snap, net, opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert handle.step_count == 1


def test_attach_raises_when_the_optimizer_already_holds_unmovable_state() -> None:
    net = LoRANet()
    opt = RowMoment(net.parameters())
    train(net, opt, 1)
    with pytest.raises(UnsupportedOptimizerError, match=r"holds state 'v_row' \(shape \(4,\)\)"):
        attach(opt, net.pairs(), space="parameter")
    attach(opt, net.pairs(), space="gradient")  # the failed attach left nothing behind


def test_unknown_state_key_names_the_qualified_class() -> None:
    class Extra(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            super().step()
            for p in self.state:
                self.state[p]["extra"] = torch.zeros(())

    register_state_transport(Extra, {"momentum_buffer": "first"})
    net = LoRANet()
    opt = Extra(net.parameters(), lr=1e-3, momentum=0.9)
    train(net, opt, 1)
    with pytest.raises(KeyError, match=rf"{Extra.__module__}\.{Extra.__qualname__} holds state 'extra'"):
        attach(opt, net.pairs(), space="parameter")


def _hf_adafactor(params, lr=1e-2, beta1=None):
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(
        params, lr=lr, beta1=beta1, scale_parameter=False, relative_step=False, warmup_init=False
    )


@pytest.mark.parametrize("beta1", [None, 0.9], ids=["no-beta1", "beta1"])
@pytest.mark.parametrize("variant, space", PARAM_MODES, ids=["full", "scalar"])
def test_transformers_adafactor_trains_and_keeps_the_product(variant, space, beta1) -> None:
    net = LoRANet()
    opt = _hf_adafactor(list(net.parameters()), beta1=beta1)
    assert "transformers.optimization.Adafactor" in registered_optimizers()
    handle = attach(opt, net.pairs(), variant=variant, space=space)
    losses = train(net, opt, 60)
    assert losses[-1] < 0.75 * losses[0], (losses[0], losses[-1])
    assert handle.step_count == 60
    assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= set(opt.state[net.A[0]])
    # with beta1 even an lr = 0 step moves the factors (by the momentum), so the product is
    # compared right after RefLoRA's pre-hook, by a pre-hook registered after it
    after = {}
    opt.register_step_pre_hook(
        lambda o, a, k: after.update(deltas=net.deltas(), norms=[(a.norm(), b.norm()) for a, b in net.pairs()])
    )
    opt.zero_grad()
    net.loss().backward()
    deltas = net.deltas()
    opt.step()
    for d0, d1 in zip(deltas, after["deltas"]):
        assert torch.allclose(d0, d1, atol=1e-5, rtol=1e-4)
    if variant == "scalar":  # and the refactor balanced the factors
        for na, nb in after["norms"]:
            assert torch.allclose(na, nb, rtol=1e-4)


def _torch_adafactor(params, lr=1e-2, beta1=None):
    return torch.optim.Adafactor(params, lr=lr)


@pytest.mark.parametrize("layout", ["plain", "transposed"])
@pytest.mark.parametrize(
    "make, beta1",
    [(_torch_adafactor, None), (_hf_adafactor, None), (_hf_adafactor, 0.9)],
    ids=["torch", "transformers", "transformers-beta1"],
)
def test_adafactor_scalar_transport_is_what_it_would_hold_after_rescaled_gradients(make, beta1, layout) -> None:
    """RefLoRA-S rescales (A, B) -> (p A, B / p); the transported state must equal the state of
    an Adafactor that saw the gradients of the rescaled pair, g_A / p and g_B p, all along."""
    g = torch.Generator().manual_seed(7)
    r, m, n, K = 3, 12, 10, 5
    A0, B0 = torch.randn(r, m, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64)
    gAs = [torch.randn(r, m, generator=g, dtype=torch.float64) for _ in range(K + 1)]
    gBs = [torch.randn(n, r, generator=g, dtype=torch.float64) for _ in range(K + 1)]
    store = (lambda t: t.T.contiguous()) if layout == "transposed" else (lambda t: t)
    A, B = nn.Parameter(store(A0)), nn.Parameter(store(B0))
    opt = make([A, B], beta1=beta1)
    attach(opt, [LoRAPair("p", A, B, (layout, layout))], variant="scalar", space="parameter", warmup_steps=K)
    seen = {}
    A_before = []
    opt.register_step_pre_hook(  # runs after RefLoRA's pre-hook: the transported state
        lambda o, a, k: seen.update(
            p=(A.detach() / A_before[-1]).mean(),
            state={q: {key: copy.deepcopy(v) for key, v in st.items()} for q, st in o.state.items()},
        )
    )
    for t in range(K + 1):
        A.grad, B.grad = store(gAs[t]).clone(), store(gBs[t]).clone()
        A_before.append(A.detach().clone())
        opt.step()
    p = seen["p"]
    assert not torch.isclose(p, torch.ones((), dtype=p.dtype))  # a real rescale happened
    A2, B2 = nn.Parameter(store(A0 * p)), nn.Parameter(store(B0 / p))
    ref = make([A2, B2], beta1=beta1)
    for t in range(K):
        A2.grad, B2.grad = store(gAs[t] / p).clone(), store(gBs[t] * p).clone()
        ref.step()
    for param, param2 in ((A, A2), (B, B2)):
        got, want = seen["state"][param], ref.state[param2]
        for key, value in want.items():
            if key == "RMS":  # recomputed from the parameter before use, every step
                continue
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert torch.allclose(got[key], value, rtol=1e-6, atol=1e-30), key
            else:
                assert float(got[key]) == float(value), key


def test_transformers_adafactor_registration_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, reflora\n"
        "assert 'transformers' not in sys.modules\n"
        "assert 'transformers.optimization.Adafactor' in reflora.transport.registered_optimizers()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    transformers = pytest.importorskip("transformers")
    opt = transformers.optimization.Adafactor([nn.Parameter(torch.zeros(2, 2))], lr=1e-3, relative_step=False)
    assert isinstance(get_state_transport(opt), HFAdafactorTransport)


def test_registered_custom_transport_is_used() -> None:
    class MomentumOnly(torch.optim.SGD):
        pass

    net = LoRANet()
    opt = MomentumOnly(net.parameters(), lr=1e-3, momentum=0.9)
    attach(opt, net.pairs(), space="parameter", warmup_steps=0)  # inherits SGD's registration through the MRO
    train(net, opt, 3)

    class Odd(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["weird"] = torch.zeros_like(p)
                        p.add_(p.grad, alpha=-group["lr"])

    register_state_transport(Odd, {"momentum": "first"})
    net = LoRANet()
    opt = Odd(net.parameters())
    attach(opt, net.pairs(), space="parameter", warmup_steps=0)
    train(net, opt, 1)
    with pytest.raises(KeyError, match="holds state 'weird'"):
        train(net, opt, 1)
