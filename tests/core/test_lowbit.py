"""Low-bit optimizer state follows the factors (reflora.lowbit): bitsandbytes 8-bit / paged,
torchao 8-bit / 4-bit / FP8. Needs the ``qlora`` extra."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'reflora[qlora]')")
pytest.importorskip("torchao", reason="needs torchao (pip install 'reflora[qlora]')")

import reflora  # noqa: E402
from reflora import UnsupportedOptimizerError  # noqa: E402
from reflora.functional import refactor_transform  # noqa: E402
from reflora.lowbit import LowBitTransport  # noqa: E402
from reflora.transport import STATE_KINDS, get_state_transport  # noqa: E402

from lowbit_helpers import ALL, IDS, fill_state, make  # noqa: E402

# A (r, m) below the 4096-element threshold (32-bit state), B (n, r) above it (quantized): one
# pair exercises both branches of every optimizer.
R, M, N = 8, 256, 1024
# the rounding one re-quantization adds, relative to the moment's norm (measured in
# benchmarks/lowbit_transport.py: 8-bit ~0.5%, FP8 ~3%, 4-bit ~10%)
TOL = {"AdamW4bit": 0.2, "AdamWFp8": 0.08}


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    # imbalanced on purpose: P is far from the identity, so a moment left unmoved is far off
    A = torch.nn.Parameter(3 * torch.randn(R, M, generator=g))
    B = torch.nn.Parameter(0.05 * torch.randn(N, R, generator=g))
    return A, B


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


# both variants under the default rule; the other rules under the full variant (they act on the
# second moment alone, the same way for either variant)
@pytest.mark.parametrize("variant, rule", [("full", "square"), ("scalar", "square"), ("full", "keep"),
                                           ("full", "reset")], ids=["full", "scalar", "full-keep", "full-reset"])
@pytest.mark.parametrize("pkg, name", ALL, ids=IDS)
def test_lowbit_transport_maps_like_the_32bit_transport(pkg, name, variant, rule) -> None:
    pairs = [_pair(0), _pair(1)]  # one group of two same-shape pairs, moved pair by pair
    params = [t for pair in pairs for t in pair]
    opt = make(pkg, name, params)
    fill_state(opt, pkg, params)
    transport = get_state_transport(opt)
    assert isinstance(transport, LowBitTransport)
    key1 = "state1" if pkg == "bnb" else "exp_avg"
    low_bit = name != "PagedAdamW"  # bitsandbytes' paged 32-bit AdamW: float32 for both
    for A, B in pairs:
        sA, sB = opt.state[A], opt.state[B]
        assert (sB[key1].dtype != torch.float32 or type(sB[key1]) is not torch.Tensor) == low_bit  # B: low-bit
        assert type(sA[key1]) is torch.Tensor and sA[key1].dtype == torch.float32  # A: under the threshold
    before = [(transport.load(opt.state[A], A), transport.load(opt.state[B], B)) for A, B in pairs]
    As = torch.stack([A.detach() for A, _ in pairs]).double()
    Bs = torch.stack([B.detach() for _, B in pairs]).double()
    T = refactor_transform(As, Bs, variant=variant)
    T = type(T)(T.left.float(), T.right.float())
    transport.move_state(opt, [reflora.LoRAPair(f"p{k}", A, B) for k, (A, B) in enumerate(pairs)], T, rule)
    for k, (A, B) in enumerate(pairs):
        (before_a, before_b), Tk = before[k], type(T)(T.left[k : k + 1], T.right[k : k + 1])
        after_a, after_b = transport.load(opt.state[A], A), transport.load(opt.state[B], B)
        assert set(before_a) == set(after_b) == set(transport.kinds) - {"max_exp_avg_sq"}  # (no amsgrad)
        for key in before_a:
            kind = transport.kinds[key]
            ref = STATE_KINDS[kind].apply(Tk, before_a[key][None], before_b[key][None], rule)
            if ref is None:  # "keep": left as it was, bit for bit (not re-quantized)
                assert torch.equal(after_a[key], before_a[key]) and torch.equal(after_b[key], before_b[key])
                continue
            ref_a, ref_b = ref[0][0], ref[1][0]
            if rule == "reset" and kind == "second":
                # (torchao's unsigned 4-bit code book has no exact zero: its smallest code is ~6e-14)
                assert after_a[key].abs().max() == 0 and after_b[key].abs().max() < 1e-12
                continue
            # the 32-bit side is the 32-bit transport exactly; the low-bit side within one rounding
            assert _rel(after_a[key], ref_a) < 1e-5, key
            err = _rel(after_b[key], ref_b)
            assert err < (TOL.get(name, 0.02) if low_bit else 1e-5), (key, err)
            # and far closer than leaving the moment unmoved would be
            assert err < 0.25 * _rel(before_b[key], ref_b), (key, err, _rel(before_b[key], ref_b))


@pytest.mark.parametrize("variant", ["full", "scalar"])
@pytest.mark.parametrize("name", ["AdamW8bit", "Adam8bit", "PagedAdamW8bit", "PagedAdamW", "Lion8bit", "AdEMAMix8bit"])
def test_bitsandbytes_optimizer_refactors_in_attach(name, variant) -> None:
    """Through attach and opt.step(): B A unchanged by a refactor-only step (lr = 0), both state
    branches moved (checked against the decay the step applies to the mapped moments)."""
    A, B = _pair(1)
    opt = make("bnb", name, [A, B], lr=1e-3, weight_decay=0.0)
    handle = reflora.attach(opt, [(A, B)], variant=variant, space="parameter")
    X, Y = torch.randn(32, M), torch.randn(32, N)
    for _ in range(3):
        opt.zero_grad()
        (X @ A.T @ B.T - Y).square().mean().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    transport = get_state_transport(opt)
    # rebalance them again, by hand, so that the next refactor is far from the identity
    with torch.no_grad():
        A.mul_(4.0)
        B.div_(4.0)
    before = {s: transport.load(opt.state[p], p) for s, p in (("A", A), ("B", B))}
    A0, B0, BA = A.detach().clone(), B.detach().clone(), (B @ A).detach().clone()
    for group in opt.param_groups:
        group["lr"] = 0.0
    A.grad, B.grad = torch.zeros_like(A), torch.zeros_like(B)  # the step only decays the moments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert torch.allclose(B @ A, BA, atol=1e-5 * float(BA.abs().max()))
    L = A.detach().double() @ torch.linalg.pinv(A0.double())  # P^T, from A' = P^T A
    assert _rel(L, torch.eye(R, dtype=L.dtype)) > 0.3  # a real refactor, not a no-op
    assert torch.allclose(B0.double() @ torch.linalg.inv(L), B.detach().double(), rtol=1e-3, atol=1e-6)  # B P^{-T}
    Linv_T = torch.linalg.inv(L).T
    betas = opt.param_groups[0]["betas"]
    decay = {"state1": betas[0], "state1.0": betas[0], "state1.1": betas[2] if len(betas) > 2 else None,
             "state2": betas[1]}
    if name.startswith("Lion"):
        decay["state1"] = betas[1]
    after = {s: transport.load(opt.state[p], p) for s, p in (("A", A), ("B", B))}
    for key, kind in transport.kinds.items():
        if kind == "first":
            ref_a, ref_b = Linv_T @ before["A"][key].double(), before["B"][key].double() @ L.T
        else:
            ref_a, ref_b = Linv_T.square() @ before["A"][key].double(), before["B"][key].double() @ L.T.square()
        d = decay[key]
        assert _rel(after["A"][key].double(), d * ref_a) < 1e-4, key  # 32-bit branch
        assert _rel(after["B"][key].double(), d * ref_b) < 0.03, key  # 8-bit branch (32-bit: PagedAdamW)


@pytest.mark.parametrize("name, space", [("AdamW8bit", "parameter"), ("PagedAdamW8bit", "parameter"),
                                         ("PagedAdamW", "parameter"), ("AdEMAMix8bit", "parameter"),
                                         ("Lion8bit", "gradient")])  # Lion: measured, docs/qlora.md
def test_auto_space_for_bitsandbytes(name, space) -> None:
    A, B = _pair()
    assert reflora.default_space(make("bnb", name, [A, B])) == space


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
def test_auto_space_for_torchao(name) -> None:
    A, B = _pair()
    assert reflora.default_space(make("torchao", name, [A, B])) == "parameter"


def test_state_the_transport_cannot_read_is_a_loud_error_and_auto_falls_back_with_one_warning() -> None:
    A, B = _pair()
    opt = make("bnb", "AdamW8bit", [A, B])
    fill_state(opt, "bnb", [A, B])
    opt.state[B]["absmax2"] = opt.state[B]["absmax2"][:-1].clone()  # not this optimizer's block size
    with pytest.raises(UnsupportedOptimizerError, match=re.escape("bitsandbytes.optim.adamw.AdamW8bit") + r".*"
                       r"absmax2.*256-element blocks.*space='gradient'"):
        reflora.attach(opt, [(A, B)], space="parameter")
    with pytest.warns(UserWarning, match=r"space='auto'.*AdamW8bit.*using space='gradient'") as rec:
        handle = reflora.attach(opt, [(A, B)], space="auto")
    assert handle.space == "gradient"
    assert sum("space='auto'" in str(w.message) for w in rec) == 1


def test_unknown_state_key_names_the_optimizer_and_the_fix() -> None:
    A, B = _pair()
    opt = make("torchao", "AdamW8bit", [A, B])
    fill_state(opt, "torchao", [A, B])
    opt.state[A]["mystery"] = torch.zeros(3)
    with pytest.raises(UnsupportedOptimizerError, match=r"torchao\.optim\.adam\.AdamW8bit.*unknown state keys "
                       r"\['mystery'\].*space='gradient'"):
        reflora.attach(opt, [(A, B)], space="parameter")


def test_lowbit_transports_are_listed_and_lazy() -> None:
    names = reflora.transport.registered_optimizers()
    for want in ("bitsandbytes.optim.adamw.AdamW8bit", "bitsandbytes.optim.lion.Lion8bit",
                 "bitsandbytes.optim.ademamix.AdEMAMix8bit", "bitsandbytes.optim.adamw.PagedAdamW",
                 "torchao.optim.AdamW4bit", "torchao.optim.AdamWFp8"):
        assert want in names
    with pytest.raises(TypeError, match="move_state"):
        get_state_transport(make("bnb", "AdamW8bit", list(_pair())))(None, {}, {}, None)


def test_sharded_factors_with_a_low_bit_optimizer_are_refused_in_parameter_space(tmp_path) -> None:
    """FSDP2 (DTensor) factors: quantized blocks of one shard cannot be remapped alone; the
    error names the optimizer and the fix, and space='auto' picks gradient space."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        A0, B0 = _pair()
        A = torch.nn.Parameter(distribute_tensor(A0.detach(), mesh, [Shard(0)]))
        B = torch.nn.Parameter(distribute_tensor(B0.detach(), mesh, [Shard(0)]))
        opt = make("bnb", "AdamW8bit", [A, B])
        with pytest.raises(UnsupportedOptimizerError, match=r"bitsandbytes\.optim\.adamw\.AdamW8bit keeps its state "
                           r"quantized.*space='gradient'"):
            reflora.attach(opt, [(A, B)], variant="scalar", space="parameter")
        with pytest.warns(UserWarning, match=r"space='auto'.*AdamW8bit.*quantized state.*using space='gradient'"):
            assert reflora.attach(opt, [(A, B)], variant="scalar").space == "gradient"
    finally:
        dist.destroy_process_group()
