"""reflora.checkpoint, the handle's state_dict: round trips across DDP / torch.compile wrappers,
older checkpoints (wrapper prefixes, another warmup, the space='auto' default), and the errors
for other settings or other pairs (strict=False for the arithmetic options)."""

from __future__ import annotations

import io
import socket

import pytest
import torch
from torch import nn

from reflora import attach
from reflora.adapters import find_pairs

from attach_helpers import LoRANet, LR, OPTIMIZERS, setup, train


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


def test_load_state_dict_rejects_other_settings() -> None:
    net, opt, handle = setup("Adam", "full", "gradient")
    state = handle.state_dict()
    net2, opt2, handle2 = setup("Adam", "scalar", "gradient")
    with pytest.raises(ValueError, match="saved with variant='full' but this handle has variant='scalar'"):
        handle2.load_state_dict(state)


def test_resuming_an_old_gradient_space_checkpoint_under_auto_names_the_fix() -> None:
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    ckpt = attach(opt, net.pairs(), space="gradient").state_dict()  # the default before space="auto"
    net2 = LoRANet()
    handle = attach(torch.optim.AdamW(list(net2.parameters()), lr=1e-2), net2.pairs())
    with pytest.raises(ValueError, match=r"saved with space='gradient' but this handle has space='parameter'.*"
                                         r"space='gradient' explicitly"):
        handle.load_state_dict(ckpt)


@pytest.mark.parametrize("option, saved, now", [
    ("resolved", 0.0, None), ("frame", "symmetric", None), ("second_moment", "keep", "square"),
    ("solver", "newton_schulz", "eigh"),
])
def test_load_state_dict_refuses_other_arithmetic_options_unless_not_strict(option, saved, now) -> None:
    extra = {"frame": "symmetric"} if option == "solver" else {}  # newton_schulz needs the symmetric frame
    net, opt, handle = setup("AdamW", "full", "parameter", **{option: saved}, **extra)
    train(net, opt, 4)
    state = handle.state_dict()
    assert state[option] == saved
    net2 = LoRANet()
    opt2 = OPTIMIZERS["AdamW"](list(net2.parameters()), LR["AdamW"])
    handle2 = attach(opt2, net2.pairs(), variant="full", space="parameter", **{option: now}, **extra)
    with pytest.raises(ValueError, match=rf"saved with .*{option}={saved!r} but this handle has .*{option}=.*attach with "
                                         rf".*{option}={saved!r} to resume the run as saved, or call load_state_dict\(state, strict=False\)"):
        handle2.load_state_dict(state)
    with pytest.warns(UserWarning, match=rf"other settings.*{option}="):
        handle2.load_state_dict(state, strict=False)
    assert handle2.step_count == 4
    # checkpoints written before these options were saved load without the check
    old = {k: v for k, v in state.items() if k not in ("resolved", "frame", "second_moment", "solver", "eps")}
    handle2.load_state_dict(old)
