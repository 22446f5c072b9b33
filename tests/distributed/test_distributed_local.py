"""reflora.distributed in one process: DTensor factors on a 1-rank mesh (the sharded code path
without a second process), the placement rule and its errors, lora_shard_placement.

The multi-process runs (FSDP2, HSDP, DDP, checkpoints) are in test_distributed.py.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from torch import nn

import reflora
from reflora import LoRAPair
from reflora.distributed import ShardingError, lora_shard_placement

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _factors(seed=0, r=4, m=12, n=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, m, generator=g), torch.randn(n, r, generator=g), torch.randn(n, m, generator=g)


def _run(A, B, T, variant, space, steps=3, opt_cls=torch.optim.AdamW, **kw):
    opt = opt_cls([A, B], lr=1e-2)
    kw.setdefault("warmup_steps", 0)  # every one of the few steps acts
    handle = reflora.attach(opt, [(A, B)], variant=variant, space=space, **kw)
    whole = (lambda t: t.full_tensor()) if isinstance(A, DTensor) else (lambda t: t)
    for _ in range(steps):
        opt.zero_grad()
        ((whole(B) @ whole(A)) - T).square().sum().backward()
        opt.step()
    return whole(A).detach(), whole(B).detach(), handle


@pytest.mark.parametrize("variant,space", [("full", "gradient"), ("full", "parameter"),
                                           ("scalar", "gradient"), ("scalar", "parameter")])
def test_sharded_code_path_equals_plain_tensors(mesh, variant, space) -> None:
    A0, B0, T = _factors()
    A, B, _ = _run(nn.Parameter(A0.clone()), nn.Parameter(B0.clone()), T, variant, space)
    dA = nn.Parameter(distribute_tensor(A0.clone(), mesh, [Shard(1)]))
    dB = nn.Parameter(distribute_tensor(B0.clone(), mesh, [Shard(0)]))
    reflora.distributed.comm_stats().reset()
    sA, sB, handle = _run(dA, dB, T, variant, space)
    assert isinstance(handle.pairs[0], reflora.distributed.ShardedLoRAPair)
    assert handle.pairs[0].shape == (4, 12, 10)
    torch.testing.assert_close(sA, A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sB, B, rtol=1e-6, atol=1e-7)
    # one all-reduce per step of [X; Y] (2 r^2 float64) or of the two squared norms
    per_step = 2 * (16 if variant == "full" else 1) * 8
    assert reflora.distributed.comm_stats().calls == 3 and reflora.distributed.comm_stats().bytes == 3 * per_step
    assert torch.equal(handle.pairs[0].delta(), sB @ sA)


def test_replicated_factor_is_counted_once(mesh) -> None:
    # A replicated, B sharded along n (a column-parallel layout): the sum over the mesh adds A's
    # Gram from one coordinate only
    A0, B0, T = _factors(1)
    A, B, _ = _run(nn.Parameter(A0.clone()), nn.Parameter(B0.clone()), T, "full", "gradient")
    dA = nn.Parameter(distribute_tensor(A0.clone(), mesh, [Replicate()]))
    dB = nn.Parameter(distribute_tensor(B0.clone(), mesh, [Shard(0)]))
    sA, sB, _ = _run(dA, dB, T, "full", "gradient")
    torch.testing.assert_close(sA, A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sB, B, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant,space,opt_cls", [
    ("full", "gradient", torch.optim.AdamW), ("full", "parameter", torch.optim.AdamW),
    ("full", "parameter", lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
    ("scalar", "gradient", torch.optim.AdamW), ("scalar", "parameter", torch.optim.AdamW)])
def test_sharded_rank_dimension_equals_plain_tensors(mesh, variant, space, opt_cls) -> None:
    # FSDP2's default Shard(0) for lora_A (and B on its rank dimension): the full variant steps on
    # gathered work copies (reflora.reshard), the scalar variant on the shards themselves
    A0, B0, T = _factors(2)
    A, B, _ = _run(nn.Parameter(A0.clone()), nn.Parameter(B0.clone()), T, variant, space, opt_cls=opt_cls)
    for b_dim in (0, 1):
        dA = nn.Parameter(distribute_tensor(A0.clone(), mesh, [Shard(0)]))
        dB = nn.Parameter(distribute_tensor(B0.clone(), mesh, [Shard(b_dim)]))
        sA, sB, handle = _run(dA, dB, T, variant, space, opt_cls=opt_cls)
        torch.testing.assert_close(sA, A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sB, B, rtol=1e-6, atol=1e-7)
        assert all(isinstance(v, DTensor) and v.placements == (Shard(0),)  # the state is the original again
                   for v in handle.optimizer.state[dA].values() if isinstance(v, DTensor))
        if variant == "full":
            with pytest.raises(RuntimeError, match=r"rank dimension.*inside RefLoRA's step"):
                handle.pairs[0].a()  # its local rows are not what the full variant works on


def _dt(mesh, t, placement):
    return nn.Parameter(distribute_tensor(t, mesh, [placement]))


def _bad_inputs(mesh):
    A0, B0, _ = _factors()
    E = LoRAPair("experts", _dt(mesh, torch.randn(8, 12), Shard(0)), _dt(mesh, torch.randn(10, 8), Shard(0)),
                 ("expert_rows", "expert_cols"), experts=2)
    return [
        ("partial", [(nn.Parameter(DTensor.from_local(A0, mesh, [Partial()])), _dt(mesh, B0, Shard(0)))],
         "scalar", "gradient", ShardingError, r"placement Partial\(sum\) on mesh dimension 0.*not pending reductions"),
        ("mixed", [(_dt(mesh, A0, Shard(1)), nn.Parameter(B0.clone()))], "full", "gradient", ShardingError,
         r"A is a DTensor \(sharded\) but B is a plain tensor"),
        ("expert stack on rows", [E], "scalar", "gradient", ShardingError,
         r"per-expert Grams and norms of an expert stack \(2 experts\)"),
    ]


def test_bad_placements_raise_at_attach(mesh) -> None:
    for label, pairs, variant, space, exc, pattern in _bad_inputs(mesh):
        params = [t for p in pairs for t in ((p.A, p.B) if isinstance(p, LoRAPair) else p)]
        opt = torch.optim.SGD(params, lr=0.1)
        with pytest.raises(exc, match=pattern):
            reflora.attach(opt, pairs, variant=variant, space=space)


def test_parameter_space_needs_parameter_shaped_state(mesh) -> None:
    A0, B0, _ = _factors()
    pair = (_dt(mesh, A0, Shard(1)), _dt(mesh, B0, Shard(0)))
    opt = torch.optim.Adafactor(list(pair), lr=1e-2)
    with pytest.raises(reflora.UnsupportedOptimizerError, match=r"transport is a function.*space='gradient'"):
        reflora.attach(opt, [pair], space="parameter")
    # space="auto": Adafactor is Adam-like ("parameter"), but not on sharded factors: it falls back
    assert reflora.default_space(opt) == "parameter"
    assert reflora.attach(opt, [pair]).space == "gradient"  # any optimizer in gradient space


def test_traced_step_on_sharded_factors_raises(mesh) -> None:
    A0, B0, _ = _factors()
    A, B = _dt(mesh, A0, Shard(1)), _dt(mesh, B0, Shard(0))
    opt = torch.optim.SGD([A, B], lr=0.1)
    handle = reflora.attach(opt, [(A, B)])
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        with pytest.raises(NotImplementedError, match="compiled optimizer step"):
            handle._pre_hook(opt, (), {})


def test_lora_shard_placement() -> None:
    A, B = nn.Parameter(torch.randn(4, 32)), nn.Parameter(torch.randn(16, 4))
    At, Bt = nn.Parameter(torch.randn(32, 4)), nn.Parameter(torch.randn(4, 16))  # transposed layout
    Ak, Bk = nn.Parameter(torch.randn(4, 3, 2, 2)), nn.Parameter(torch.randn(8, 4, 1, 1))  # conv kernels
    odd = (nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(16, 4)))
    pairs = [LoRAPair("p", A, B), LoRAPair("t", At, Bt, ("transposed", "transposed")),
             LoRAPair("k", Ak, Bk, ("flatten", "flatten")), LoRAPair("odd", *odd)]
    with pytest.warns(UserWarning, match=r"cannot be sharded along m / n over 4 ranks.*'odd' A \(4, 6\)"):
        place = lora_shard_placement(pairs, shard_size=4)
    assert [place(t) for t in (A, B, At, Bt, Ak, Bk)] == [Shard(1), Shard(0), Shard(0), Shard(1), None, Shard(0)]
    # conv A (4, 3, 2, 2): in = 3 is not a multiple of 4, the kernel dims neither -> FSDP2's default
    assert place(odd[0]) is None and place(odd[1]) == Shard(0)
    assert place(nn.Parameter(torch.randn(4, 32))) is None  # not a factor: FSDP2's default
    assert lora_shard_placement(pairs[:1], shard_size=2)(A) == Shard(1)


def test_lora_shard_placement_on_a_peft_model() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules="all-linear"))
    place = lora_shard_placement(model, shard_size=2)
    got = {n: place(p) for n, p in model.named_parameters()}
    assert {got[n] for n in got if "lora_A" in n} == {Shard(1)}
    assert {got[n] for n in got if "lora_B" in n} == {Shard(0)}
    assert {got[n] for n in got if "lora_" not in n} == {None}
    assert re.search(r"lora_A", next(n for n in got if got[n] == Shard(1)))


def test_trainer_callback_names_the_presharding_fix(mesh) -> None:
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from reflora.integrations.transformers import RefLoRACallback

    args, state = SimpleNamespace(output_dir="."), SimpleNamespace(global_step=0)
    A0, B0, _ = _factors()
    pair = (_dt(mesh, A0, Shard(0)), _dt(mesh, B0, Shard(0)))  # what accelerate's fully_shard gives lora_A
    opt = torch.optim.AdamW(list(pair), lr=1e-2)
    for variant in ("full", "scalar"):  # both take it
        cb = RefLoRACallback(pairs=[pair], variant=variant)
        cb.on_train_begin(args, state, None, model=nn.Linear(1, 1), optimizer=opt)
        cb.handle.remove()
    # an expert stack sharded across its experts' slices still needs lora_shard_placement
    E = LoRAPair("experts", _dt(mesh, torch.randn(8, 12), Shard(0)), _dt(mesh, torch.randn(10, 8), Shard(0)),
                 ("expert_rows", "expert_cols"), experts=2)
    cb = RefLoRACallback(pairs=[E], variant="full")
    with pytest.raises(ShardingError, match=r"expert stack.*Under Trainer / accelerate.*NO_WRAP"):
        cb.on_train_begin(args, state, None, model=nn.Linear(1, 1), optimizer=torch.optim.AdamW([E.A, E.B]))


@pytest.mark.parametrize("variant,space", [("full", "parameter"), ("scalar", "gradient")])
def test_sharded_expert_stack_equals_plain_tensors(mesh, variant, space) -> None:
    # PEFT's MoE layout: A (E * r, m) expert-major rows, B (n, r * E) expert-minor columns; sharded
    # as lora_shard_placement does (A along m, B along n), every expert is still its own pair
    from reflora.pairs import to_core

    g = torch.Generator().manual_seed(4)
    E, r, m, n = 2, 2, 12, 10
    A0, B0, T = torch.randn(E * r, m, generator=g), torch.randn(n, r * E, generator=g), torch.randn(E, n, m, generator=g)
    out = []
    for sharded in (False, True):
        A = nn.Parameter(distribute_tensor(A0.clone(), mesh, [Shard(1)]) if sharded else A0.clone())
        B = nn.Parameter(distribute_tensor(B0.clone(), mesh, [Shard(0)]) if sharded else B0.clone())
        whole = (lambda t: t.full_tensor()) if sharded else (lambda t: t)
        pair = LoRAPair("experts", A, B, ("expert_rows", "expert_cols"), experts=E)
        opt = torch.optim.AdamW([A, B], lr=1e-2)
        reflora.attach(opt, [pair], variant=variant, space=space, warmup_steps=0)
        for _ in range(3):
            opt.zero_grad()
            prod = to_core(whole(B), "expert_cols", E) @ to_core(whole(A), "expert_rows", E)
            (prod - T).square().sum().backward()
            opt.step()
        out.append((whole(A).detach(), whole(B).detach()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_rank_dimension_sharded_twice_takes_the_general_redistribution(mesh, space) -> None:
    # A's rank dimension sharded on both dimensions of a 2-D mesh (nested shards): the batched gather
    # leaves it to DTensor.redistribute (reflora.reshard); the result is the plain one
    A0, B0, T = _factors(4)
    A, B, _ = _run(nn.Parameter(A0.clone()), nn.Parameter(B0.clone()), T, "full", space)
    mesh2 = init_device_mesh("cpu", (1, 1))
    dA = nn.Parameter(distribute_tensor(A0.clone(), mesh2, [Shard(0), Shard(0)]))
    dB = nn.Parameter(distribute_tensor(B0.clone(), mesh2, [Shard(0), Replicate()]))
    reflora.distributed.comm_stats().reset()
    sA, sB, _ = _run(dA, dB, T, "full", space)
    torch.testing.assert_close(sA, A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sB, B, rtol=1e-6, atol=1e-7)
    # per step: the Grams' all-reduce and one redistribution per gathered tensor (A, grad_A, and from
    # the second step AdamW's 2 moments in parameter space), not one batched all-gather
    assert reflora.distributed.comm_stats().calls == {"gradient": 3 * 3, "parameter": 3 + 5 + 5}[space]
