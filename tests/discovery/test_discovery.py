"""Contract suite: every finder x model family (adapter discovery, issue 'Adapter discovery')."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reflora
from reflora.adapters import find_pairs, list_finders, NoPairsFoundError
from reflora.functional import refactor

from discovery_models import FAMILIES, has

PARAMS = [
    pytest.param(build, id=name, marks=pytest.mark.skipif(not has(*deps), reason=f"needs {', '.join(deps)}"))
    for name, (build, deps) in FAMILIES.items()
]


def _randomise_B(pairs, scale=0.2):
    """B = 0 at init makes every refactor a no-op: give the pairs a real product first (and A,
    which PEFT's embedding LoRA initialises to zero)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pairs:
            a, b = p.a(), p.b()
            if not a.any():
                a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) / a.shape[1] ** 0.5)
            b.copy_(scale * torch.randn(b.shape, generator=g, dtype=b.dtype) / b.shape[1] ** 0.5)


@pytest.mark.parametrize("build", PARAMS)
def test_finds_exactly_the_expected_pairs(build) -> None:
    case = build()
    pairs = find_pairs(case.model)
    assert {p.name: p.shape for p in pairs} == case.expected
    assert len(pairs) == len(case.expected)
    for p in pairs:  # views share storage with the parameters
        assert p.a().data_ptr() == p.A.data_ptr() and p.b().data_ptr() == p.B.data_ptr()


@pytest.mark.parametrize("build", PARAMS)
def test_refactor_keeps_outputs_and_merge(build) -> None:
    case = build()
    case.model.eval()
    pairs = find_pairs(case.model)
    _randomise_B(pairs)
    with torch.no_grad():
        before = case.output(case.model).clone()
        for p in pairs:
            A2, B2 = refactor(p.a(), p.b())
            p.a().copy_(A2)
            p.b().copy_(B2)
        after = case.output(case.model)
    assert (after - before).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())
    for p in pairs:  # and they are balanced now (every expert of an MoE pair on its own)
        a, b = p.a().detach(), p.b().detach()
        assert torch.allclose(a @ a.mT, b.mT @ b, atol=1e-4 * float(a.norm() * b.norm() + 1e-12))
    if case.merge is not None:
        with torch.no_grad():
            merged = case.merge(case.model)
            out = case.output(merged)
        assert (out - before).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())


@pytest.mark.parametrize("build", PARAMS)
@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_training_with_reflora_lowers_the_loss(build, space) -> None:
    case = build()
    case.model.train()
    params = [p for p in case.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    handle = reflora.attach(opt, case.model, space=space)
    assert len(handle.pairs) == len(case.expected)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = case.loss(case.model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_builtin_finders_in_priority_order() -> None:
    assert [n for n, _ in list_finders()][:4] == ["peft_lora", "reflora_pyg", "marked_bottleneck", "owned_factors"]


# ------------------------------------------------------------------------------- PEFT specifics

needs_hf = pytest.mark.skipif(not has("transformers", "peft"), reason="needs transformers and peft")


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


@needs_hf
def test_multiple_adapters_active_by_default_all_on_request() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert [p.name.rsplit(".", 1)[1] for p in find_pairs(model)] == ["one"]
    model.set_adapter("two")
    assert sorted(p.name.rsplit(".", 1)[1] for p in find_pairs(model)) == ["two", "two"]
    every = find_pairs(model, adapters="all", trainable_only=False)
    assert sorted(p.name.rsplit(".", 1)[1] for p in every) == ["one", "two", "two"]


@needs_hf
@pytest.mark.parametrize("tuner", ["vera", "adalora", "loha"])
def test_tuners_refLoRA_does_not_apply_to_warn_and_error(tuner) -> None:
    import peft as P

    cfgs = {
        "vera": lambda: P.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "adalora": lambda: P.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10),
        "loha": lambda: P.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    }
    model = P.get_peft_model(_tiny_llama(), cfgs[tuner]())
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(NoPairsFoundError, match="finders asked: peft_lora"):
            find_pairs(model)


@needs_hf
def test_lora_fa_frozen_A_is_skipped_with_a_warning() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="A factor is frozen"):
        pairs = find_pairs(model)
    assert [p.name.split(".")[-2] for p in pairs] == ["v_proj"]


def test_nothing_found_lists_supported_layers_and_how_to_register() -> None:
    with pytest.raises(NoPairsFoundError) as err:
        find_pairs(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    msg = str(err.value)
    for name, _ in list_finders():
        assert name in msg
    assert "register_finder" in msg and "reflora.attach" in msg


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: reflora.adapters.mark_pair(torch.nn.Linear(2, 2)), TypeError, "mark_pair expects"),
        (lambda: reflora.adapters.mark_pair(torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.Linear(2, 4))), ValueError, "bias=False"),
        (
            lambda: reflora.adapters.mark_pair(torch.nn.Sequential(torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(3, 4))),
            ValueError,
            r"A has rank 2 \(shape \(2, 8\)\) but B has rank 3 \(shape \(4, 3\)\)",
        ),
        (lambda: find_pairs(torch.nn.Linear(2, 2), adapters="some"), ValueError, "adapters must be 'active' or 'all'"),
    ],
)
def test_discovery_bad_input(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(not has("torch_geometric"), reason="needs torch_geometric")
def test_pyg_lazy_layer_needs_a_forward_first() -> None:
    from torch_geometric.nn import GCNConv

    from reflora.adapters.pyg import add_lora

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = GCNConv(-1, 4)

    net = add_lora(Net(), r=2)
    with pytest.raises(ValueError, match="not initialised yet .* run one forward pass"):
        find_pairs(net)
    with pytest.raises(ValueError, match="no linear map to adapt"):
        add_lora(torch.nn.Sequential(torch.nn.ReLU()), r=2)


@pytest.mark.skipif(not has("timm"), reason="needs timm")
def test_vit_target_modules_errors() -> None:
    from reflora.adapters.timm import vit_target_modules

    with pytest.raises(ValueError, match="no nn.Linear inside attn / mlp blocks"):
        vit_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="parts must be"):
        vit_target_modules(torch.nn.Linear(2, 2), parts=("head",))


class LoRALinear(nn.Module):
    def __init__(self, m: int, n: int, r: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m) / m**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, m) / m**0.5)
        self.lora_B = nn.Parameter(torch.randn(n, r) * 0.1)

    def forward(self, x):
        return x @ (self.weight + self.lora_B @ self.lora_A).T


def test_ambiguous_canonical_names_keep_the_raw_names() -> None:
    model = nn.Module()
    model.module = nn.Sequential(LoRALinear(4, 4))
    model.add_module("0", LoRALinear(4, 4))
    assert sorted(p.name for p in find_pairs(model)) == ["0", "module.0"]
