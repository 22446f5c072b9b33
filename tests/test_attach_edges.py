"""reflora.attach edge cases: GradScaler with fused / foreach / capturable optimizers, state a
transport cannot move, Adafactor (torch's and transformers'), checkpoints across wrappers."""

from __future__ import annotations

import copy
import io
import socket

import pytest
import torch
from torch import nn

from reflora import LoRAPair, UnsupportedOptimizerError, attach
from reflora.adapters import find_pairs
from reflora.pairs import canonical_name
from reflora.transport import get_state_transport, register_state_transport, registered_optimizers
from reflora.transport.adafactor import HFAdafactorTransport

from attach_helpers import LR, MODE_IDS, MODES, OPTIMIZERS, LoRANet, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAM_MODES = [("full", "parameter"), ("scalar", "parameter")]


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


# ------------------------------------------------------------------------------- A: GradScaler

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


# ------------------------------------------------------------------------------- B: state


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


# ------------------------------------------------------------------------------- C: wrappers


class LoRALinear(nn.Module):
    def __init__(self, m: int, n: int, r: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m) / m**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, m) / m**0.5)
        self.lora_B = nn.Parameter(torch.randn(n, r) * 0.1)

    def forward(self, x):
        return x @ (self.weight + self.lora_B @ self.lora_A).T


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(LoRALinear(12, 16), nn.Tanh(), nn.Sequential(LoRALinear(16, 8)))


def _fit(module: nn.Module, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(11)
    X, Y = torch.randn(32, 12, generator=g), torch.randn(32, 8, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        (module(X) - Y).square().mean().backward()
        opt.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrap(kind: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(module to attach to, module to run): compile's forward is not needed, DDP's is run."""
    if kind == "compile":
        return torch.compile(model), model
    ddp = nn.parallel.DistributedDataParallel(model)
    return ddp, ddp


@pytest.mark.parametrize("direction", ["wrapped-to-bare", "bare-to-wrapped"])
@pytest.mark.parametrize("kind", ["compile", "ddp"])
def test_checkpoint_moves_between_wrapped_and_bare_models(kind, direction, request) -> None:
    if kind == "ddp":
        request.getfixturevalue("gloo_group")
    kw = dict(variant="full", space="gradient", interval=3)

    def build(seed: int, wrapped: bool):
        model = _model(seed)
        attach_to, run = _wrap(kind, model) if wrapped else (model, model)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, run, opt, attach(opt, attach_to, **kw)

    model, run, opt, handle = build(0, direction == "wrapped-to-bare")
    bare_names = [p.name for p in find_pairs(_model(0))]
    assert [p.name for p in handle.pairs] == bare_names == ["0", "2.0"]
    _fit(run, opt, 4)  # 4 % 3 != 0: the next step applies the cached metric
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "reflora": handle.state_dict()}, buf)
    assert set(handle.state_dict()["cache"]) == {"0", "2.0"}
    _fit(run, opt, 5)
    want = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, run2, opt2, handle2 = build(1, direction == "bare-to-wrapped")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    handle2.load_state_dict(ckpt["reflora"])
    assert handle2.step_count == 4 and len(handle2.cached_metrics) == 2
    _fit(run2, opt2, 5)
    for w, p in zip(want, model2.parameters()):
        assert torch.equal(w, p.detach())


def test_older_checkpoints_with_wrapper_prefixes_still_load() -> None:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    handle = attach(opt, model, interval=2, warmup_steps=0)
    _fit(model, opt, 3)
    state = handle.state_dict()
    old = dict(state, pair_names=[f"module._orig_mod.{n}" for n in state["pair_names"]])
    old["cache"] = {f"module.{k}": v for k, v in state["cache"].items()}
    handle2 = attach(torch.optim.SGD(model.parameters(), lr=1e-2), model, interval=2, warmup_steps=0)
    handle2.load_state_dict(old)
    assert handle2.step_count == 3 and sorted(handle2.cached_metrics) == [0, 1]


def test_pair_mismatch_error_shows_where_and_hints_at_wrappers() -> None:
    model = _model(0)
    handle = attach(torch.optim.SGD(model.parameters(), lr=1e-2), model)
    state = dict(handle.state_dict(), pair_names=["0", "2.1"])
    other = attach(torch.optim.SGD(model.parameters(), lr=1e-2), model)
    with pytest.raises(ValueError, match=r"first differ at position 1: checkpoint '2\.1' vs handle '2\.0'.*DDP"):
        other.load_state_dict(state)


def test_canonical_names() -> None:
    assert canonical_name("module._orig_mod.layers.0._fsdp_wrapped_module.q.default") == "layers.0.q.default"
    assert canonical_name("_orig_mod.module.x._checkpoint_wrapped_module.y") == "x.y"
    assert canonical_name("encoder.module.x") == "encoder.module.x"  # a model's own child called module
    assert canonical_name("module") == ""


def test_ambiguous_canonical_names_keep_the_raw_names() -> None:
    model = nn.Module()
    model.module = nn.Sequential(LoRALinear(4, 4))
    model.add_module("0", LoRALinear(4, 4))
    assert sorted(p.name for p in find_pairs(model)) == ["0", "module.0"]


# --------------------------------------------------------------------------- state transport paths


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


def test_diagnostics_under_deepspeed_zero_is_an_error_naming_diagnose() -> None:
    """DeepSpeed's handle records no diagnostics: asking for them raises instead of being ignored
    (a stand-in for DeepSpeed's ZeRO-1/2 wrapper: a class from a ``deepspeed`` module holding the
    torch optimizer in ``.optimizer``)."""
    A, B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(6, 4))
    wrapper_cls = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    wrapper = wrapper_cls()
    wrapper.optimizer = torch.optim.AdamW([A, B])
    with pytest.raises(ValueError, match=r"diagnostics_interval under DeepSpeed ZeRO.*diagnose\(pairs\)"):
        attach(wrapper, [(A, B)], space="gradient", diagnostics_interval=5)


def test_checkpoints_of_another_warmup_load_once_both_warmups_are_over() -> None:
    # 0.3.0's default acted from step 1 (warmup_steps=0); today's waits 3 steps where the gate is
    # on. A checkpoint taken after both warmups acts at the same steps either way: it loads.
    def handle(**kw):
        net = LoRANet(seed=0)
        return attach(torch.optim.AdamW(list(net.parameters()), lr=1e-2), net.pairs(), **kw)

    saved = handle(warmup_steps=0).state_dict()
    assert handle().warmup_steps == 3
    for steps, ok in ((2, False), (3, True), (7, True)):
        state = dict(saved, step_count=steps)
        if ok:
            h = handle()
            h.load_state_dict(state)
            assert h.step_count == steps and h.warmup_steps == 3
        else:  # step 3 would act under warmup_steps=0 and not under the default: refused, with the fix
            with pytest.raises(ValueError, match=r"warmup_steps=0 but this handle has warmup_steps=3.*warmup_steps=0 explicitly"):
                handle().load_state_dict(state)
    # with interval=2, warmups 0 and 3 act on steps of opposite parity: refused
    odd = dict(handle(warmup_steps=0, interval=2).state_dict(), step_count=10)
    with pytest.raises(ValueError, match="warmup_steps=0 but this handle has warmup_steps=3"):
        handle(interval=2).load_state_dict(odd)
    handle(interval=2, warmup_steps=2).load_state_dict(odd)  # warmups 0 and 2: the same phase
