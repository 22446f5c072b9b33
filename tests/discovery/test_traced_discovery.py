"""Traced discovery (issue 19): pairs found from the forward pass, every one verified."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reflora
from reflora.adapters import DiscoveryReport, NoPairsFoundError, find_pairs
from reflora.adapters._proposals import ProposalMode
from reflora.adapters.traced import _random_P, trace_pairs
from reflora.functional import refactor
from reflora.pairs import LoRAPair

import traced_models as tm
from discovery_models import FAMILIES, has


def _summary(pairs):
    return {p.name: (p.layout, p.experts, p.shape) for p in pairs}


def _traced(model, inputs):
    report = trace_pairs(model, inputs)
    assert isinstance(report, DiscoveryReport)
    return report


def _refactor_keeps_outputs(model, inputs, pairs, tol=1e-4):
    """reflora's own refactor of every found pair leaves the outputs unchanged (B made non-zero first)."""
    g = torch.Generator().manual_seed(3)
    was = model.training
    model.eval()
    with torch.no_grad():
        for p in pairs:
            a, b = p.a(), p.b()
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[-1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) / b.shape[-1] ** 0.5)
        call = (lambda: model(**inputs)) if isinstance(inputs, dict) else (
            lambda: model(*inputs) if isinstance(inputs, tuple) else model(inputs))
        out = call()
        before = (out.logits if hasattr(out, "logits") else out).clone()
        for p in pairs:
            a2, b2 = refactor(p.a(), p.b())
            p.a().copy_(a2)
            p.b().copy_(b2)
        out = call()
        after = out.logits if hasattr(out, "logits") else out
    model.train(was)
    assert (after - before).abs().max() <= tol * max(1.0, before.abs().max().item())


# ------------------------------------------------------------------------ 1. layouts and forms


class ChainedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(16, 8).requires_grad_(False)
        self.a = nn.Linear(16, 4, bias=False)
        self.b = nn.Linear(4, 8, bias=False)
        self.A2 = nn.Parameter(torch.randn(3, 8))
        self.B2 = nn.Parameter(torch.randn(8, 3))

    def forward(self, x):
        h = self.base(x) + self.b(self.a(x))
        return h + F.linear(F.linear(h, self.A2), self.B2)


class MatmulEinsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(4, 16))
        self.B = nn.Parameter(torch.randn(8, 4))
        self.C = nn.Parameter(torch.randn(2, 8))
        self.D = nn.Parameter(torch.randn(8, 2))

    def forward(self, x):
        h = torch.einsum("bsi,ri->bsr", x, self.A) @ self.B.T
        return h + torch.einsum("bsr,nr->bsn", h @ self.C.T, self.D)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(16, 4))  # (m, r)
        self.B = nn.Parameter(torch.randn(4, 8))  # (r, n)

    def forward(self, x):
        return x @ self.A @ self.B


class ConvKxK1x1(nn.Module):
    """PEFT's conv LoRA shape: a k x k A, then a 1 x 1 B."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Conv2d(3, 6, 3, padding=1).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(2, 3, 3, 3))
        self.B = nn.Parameter(torch.randn(6, 2, 1, 1))

    def forward(self, x):
        return self.base(x) + F.conv2d(F.conv2d(x, self.A, padding=1), self.B)


class EmbeddingA(nn.Module):
    """PEFT's embedding LoRA: ``lora_embedding_A`` (r, vocab) used as a table, then B (dim, r)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8).requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.zeros(4, 20))})
        self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(8, 4))})

    def forward(self, ids):
        after_A = F.embedding(ids, self.lora_embedding_A["default"].T)
        return self.emb(ids) + (after_A @ self.lora_embedding_B["default"].T) * 2.0


class StackedMoE(nn.Module):
    """Experts stacked as PEFT stacks them, A (E r, m) and B (n, r E), routed top-1 in Python."""

    E, r = 4, 2

    def __init__(self, batched: bool) -> None:
        super().__init__()
        self.batched = batched
        self.router = nn.Linear(8, self.E, bias=False).requires_grad_(False)
        self.W = nn.Parameter(torch.randn(self.E, 6, 8) / 3, requires_grad=False)
        self.A = nn.Parameter(torch.randn(self.E * self.r, 8))
        self.B = nn.Parameter(torch.randn(6, self.r * self.E))

    def forward(self, x):
        route = self.router(x).argmax(-1)
        A3 = self.A.view(self.E, self.r, 8)
        B3 = self.B.view(6, self.r, self.E).permute(2, 0, 1)
        if self.batched:  # delta weights of every expert at once, then gather per token
            W = self.W + torch.einsum("enr,erm->enm", B3, A3)
            return torch.einsum("tm,tnm->tn", x, W[route])
        y = x.new_zeros(x.shape[0], 6)
        for e in range(self.E):
            idx = (route == e).nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            xe = x[idx]
            y[idx] = xe @ self.W[e].T + (xe @ A3[e].T) @ B3[e].T
        return y


def _tokens(n=64, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1))


LAYOUTS = {
    "chained-linear": (ChainedLinear, lambda: torch.randn(5, 16),
                       None),
    "matmul-einsum": (MatmulEinsum, lambda: torch.randn(2, 3, 16), None),
    "transposed": (Transposed, lambda: torch.randn(5, 16), {"A+B": (("transposed", "transposed"), 1, (4, 16, 8))}),
    "conv-kxk-1x1": (ConvKxK1x1, lambda: torch.randn(2, 3, 6, 6), {"A+B": (("flatten", "flatten"), 1, (2, 27, 6))}),
    "embedding-A": (EmbeddingA, lambda: torch.randint(0, 20, (3, 7)), {"default": (("plain", "plain"), 1, (4, 20, 8))}),
    "moe-routed-loop": (lambda: StackedMoE(False), _tokens,
                        {"A+B": (("expert_rows", "expert_cols"), 4, (2, 8, 6))}),
    "moe-batched-einsum": (lambda: StackedMoE(True), _tokens,
                           {"A+B": (("expert_rows", "expert_cols"), 4, (2, 8, 6))}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_are_found_and_refactoring_them_keeps_outputs(name) -> None:
    build, inputs, expected = LAYOUTS[name]
    torch.manual_seed(0)
    model, x = build(), inputs()
    pairs = find_pairs(model, example_inputs=x)
    if name == "chained-linear":
        assert {(p.A, p.B) for p in pairs} == {(model.a.weight, model.b.weight), (model.A2, model.B2)}
        assert all(p.layout == ("plain", "plain") for p in pairs)
    elif name == "matmul-einsum":
        assert [(p.A, p.B) for p in pairs] == [(model.A, model.B), (model.C, model.D)]
        assert [p.shape for p in pairs] == [(4, 16, 8), (2, 8, 8)]
    else:
        assert _summary(pairs) == expected
    _refactor_keeps_outputs(model, x, pairs)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_on_device(device) -> None:
    torch.manual_seed(0)
    for model, x, expected in ((ChainedLinear(), torch.randn(5, 16), 2), (StackedMoE(True), _tokens(), 1),
                               (ConvKxK1x1(), torch.randn(2, 3, 6, 6), 1)):
        model.to(device)
        pairs = find_pairs(model, example_inputs=x.to(device))
        assert len(pairs) == expected and all(p.A.device.type == device for p in pairs)


def test_pairs_sharing_a_module_are_named_after_their_factors() -> None:
    names = [p.name for p in find_pairs(ChainedLinear(), example_inputs=torch.randn(5, 16))]
    assert names == ["A2+B2", "a+b"]  # in named_parameters() order of A


# --------------------------------------------------------------- 3. third-party LoRAs, no config


def test_torchtune_lora_and_dora_linear() -> None:
    for dora in (False, True):
        torch.manual_seed(0)
        model = tm.TorchtuneStyleMLP(dora=dora).train()  # dropout 0.1 is on: discovery turns it off
        x = torch.randn(2, 5, 16)
        pairs = find_pairs(model, example_inputs=x)
        assert _summary(pairs) == {"w1": (("plain", "plain"), 1, (4, 16, 24)), "w2": (("plain", "plain"), 1, (4, 24, 16))}
        assert pairs[0].A is model.w1.lora_a.weight and pairs[0].B is model.w1.lora_b.weight
        assert model.training and model.w1.dropout.training  # flags restored
        if not dora:
            _refactor_keeps_outputs(model, x, pairs)


@pytest.mark.skipif(not importlib.util.find_spec("torchtune"), reason="torchtune does not install beside this torch")
def test_real_torchtune_lora_linear() -> None:  # pragma: no cover - torchtune 0.6 needs torchao / torchdata
    from torchtune.modules.peft import DoRALinear, LoRALinear

    for cls in (LoRALinear, DoRALinear):
        layer = cls(16, 8, rank=4, alpha=8)
        layer.weight.requires_grad_(False)
        assert [(p.A, p.B) for p in find_pairs(layer, example_inputs=torch.randn(3, 16))] == [
            (layer.lora_a.weight, layer.lora_b.weight)]


@pytest.mark.skipif(not importlib.util.find_spec("loralib"), reason="needs loralib (test extra)")
def test_loralib_traced_agrees_with_the_name_finder() -> None:
    import loralib as lora

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = lora.Embedding(20, 8, r=2)
            self.fc = lora.Linear(8, 8, r=4, lora_dropout=0.1)
            self.conv = lora.Conv2d(1, 2, 3, r=2, padding=1)

        def forward(self, ids):
            h = self.fc(self.emb(ids))  # (b, s, 8)
            return self.conv(h.unsqueeze(1))

    torch.manual_seed(0)
    model = Net()
    lora.mark_only_lora_as_trainable(model)
    ids = torch.randint(0, 20, (2, 8))
    structural = find_pairs(model)
    traced = _traced(model, ids).traced
    assert _summary(traced) == _summary(structural) and len(traced) == 3
    assert [(p.A, p.B) for p in traced] == [(p.A, p.B) for p in structural]
    w = model.fc.weight.detach().clone()
    model.train()
    trace_pairs(model, ids)
    assert not model.fc.merged and torch.equal(model.fc.weight, w)  # eval() would have merged B A into W


def test_deepspeed_chat_names() -> None:
    torch.manual_seed(0)
    model = tm.DeepSpeedChatModel()
    pairs = find_pairs(model, example_inputs=torch.randn(4, 16))
    assert _summary(pairs) == {"proj": (("transposed", "transposed"), 1, (4, 16, 12)),
                               "out": (("transposed", "transposed"), 1, (2, 12, 8))}
    assert pairs[0].A is model.proj.lora_right_weight and pairs[0].B is model.proj.lora_left_weight
    _refactor_keeps_outputs(model, torch.randn(4, 16), pairs)


def test_diffusers_down_up_layers() -> None:
    torch.manual_seed(0)
    model = tm.DiffusersStyleBlock()
    x = torch.randn(2, 3, 5, 5)
    pairs = find_pairs(model, example_inputs=x)
    assert _summary(pairs) == {"conv.lora_layer": (("flatten", "flatten"), 1, (2, 27, 6)),
                               "to_q.lora_layer": (("plain", "plain"), 1, (2, 6, 6))}
    _refactor_keeps_outputs(model, x, pairs)


def test_minlora_parametrizations_agree_with_the_name_finder() -> None:
    torch.manual_seed(0)
    model = tm.minlora_add_lora(tm.MinLoRANet()).train()
    x = torch.randn(2, 3, 4, 4)
    structural = find_pairs(model)
    report = _traced(model, x)
    assert _summary(report.traced) == _summary(structural) == {
        "conv.parametrizations.weight.0": (("plain", "plain"), 1, (4, 27, 4)),
        "fc.parametrizations.weight.0": (("plain", "plain"), 1, (4, 64, 10)),
    }
    assert [(p.A, p.B) for p in report.traced] == [(p.A, p.B) for p in structural]


def test_arbitrary_names() -> None:
    torch.manual_seed(0)
    model = tm.Arbitrary()
    x = torch.randn(6, 16)
    report = find_pairs(model, example_inputs=x, explain=True)
    assert {(p.A, p.B, p.layout) for p in report.pairs} == {
        (model.U, model.V, ("plain", "plain")),
        (model.left, model.right, ("transposed", "transposed")),
        (model.sandwich["alpha"].weight, model.sandwich["omega"].weight, ("plain", "plain")),
    }
    assert {p.name for p in report.pairs} == {"U+V", "left+right", "sandwich"}
    _refactor_keeps_outputs(model, x, report.pairs)


@pytest.mark.skipif(not has("torch_geometric"), reason="needs torch_geometric")
def test_pyg_model_with_hand_injected_lora() -> None:
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn import GATConv, GCNConv

    class HandLoRA(nn.Module):  # wraps a PyG Linear; names its factors P and Q
        def __init__(self, base, r):
            super().__init__()
            self.base = base.requires_grad_(False)
            self.P = nn.Parameter(torch.randn(r, base.in_channels) / 4)
            self.Q = nn.Parameter(torch.zeros(base.out_channels, r))

        def reset_parameters(self):
            self.base.reset_parameters()

        def forward(self, x):
            return self.base(x) + x @ self.P.T @ self.Q.T

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gcn = GCNConv(34, 8)
            self.gat = GATConv(8, 4, heads=2)

        def forward(self, x, edge_index):
            return self.gat(torch.relu(self.gcn(x, edge_index)), edge_index)

    torch.manual_seed(0)
    net = Net()
    net.gcn.lin = HandLoRA(net.gcn.lin, 2)
    net.gat.lin = HandLoRA(net.gat.lin, 2)
    for n, p in net.named_parameters():
        p.requires_grad_(n.endswith((".P", ".Q")))
    data = KarateClub()[0]
    pairs = find_pairs(net, example_inputs=(data.x, data.edge_index))
    assert _summary(pairs) == {"gcn.lin": (("plain", "plain"), 1, (2, 34, 8)),
                               "gat.lin": (("plain", "plain"), 1, (2, 8, 8))}
    _refactor_keeps_outputs(net, (data.x, data.edge_index), pairs)


# ------------------------------------------------------------------------------- 4. negatives


class Bottleneck(nn.Module):
    def __init__(self, between) -> None:
        super().__init__()
        self.base = nn.Linear(16, 8).requires_grad_(False)
        self.down = nn.Linear(16, 4, bias=False)
        self.up = nn.Linear(4, 8, bias=False)
        self.between = between

    def forward(self, x):
        return self.base(x) + self.up(self.between(self.down(x)))


@pytest.mark.parametrize("between, op", [(nn.ReLU(), "relu"), (nn.LayerNorm(4), "native_layer_norm"),
                                         (nn.RMSNorm(4, elementwise_affine=False), "rsqrt")])
def test_nonlinearity_or_norm_between_the_factors_is_rejected(between, op) -> None:
    model = Bottleneck(between)
    report = find_pairs(model, example_inputs=torch.randn(6, 16), explain=True)
    assert report.pairs == []
    (cand,) = report.rejected
    assert (cand.A, cand.B) == ("down.weight", "up.weight") and op in cand.between
    assert "more than B A" in cand.reason
    with pytest.raises(NoPairsFoundError, match="explain=True"):
        find_pairs(model, example_inputs=torch.randn(6, 16))


def test_the_random_P_is_dense_well_conditioned_and_catches_a_relu() -> None:
    g = torch.Generator().manual_seed(0)
    P, P_inv_T = _random_P(3, 4, g)
    assert torch.allclose(P.mT @ P_inv_T, torch.eye(4, dtype=P.dtype).expand(3, 4, 4), atol=1e-12)
    assert (P.abs() > 0).all() and float(torch.linalg.cond(P).max()) <= 2 + 1e-9
    # a positive diagonal P passes a ReLU bottleneck; this one does not
    A, B, x = torch.randn(4, 16, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64), torch.randn(9, 16, dtype=torch.float64)
    f = lambda A, B: torch.relu(x @ A.T) @ B.T  # noqa: E731
    D = torch.diag(torch.rand(4, dtype=torch.float64) + 0.5)
    assert torch.allclose(f(D @ A, B @ torch.linalg.inv(D)), f(A, B))
    assert not torch.allclose(f(P[0].mT @ A, B @ P_inv_T[0]), f(A, B), rtol=1e-3)


def test_tied_A_shared_by_two_Bs_is_rejected() -> None:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(4, 16))
            self.B1 = nn.Parameter(torch.randn(8, 4))
            self.B2 = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            h = x @ self.A.T
            return torch.cat([h @ self.B1.T, torch.tanh(h @ self.B2.T)], -1)

    report = find_pairs(Tied(), example_inputs=torch.randn(5, 16), explain=True)
    assert report.pairs == [] and {(c.A, c.B) for c in report.rejected} == {("A", "B1"), ("A", "B2")}


def test_a_chain_of_three_factors_is_ambiguous_and_rejected() -> None:
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(4, 16))
            self.B = nn.Parameter(torch.randn(4, 4))
            self.C = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.A.T @ self.B.T @ self.C.T

    report = find_pairs(Three(), example_inputs=torch.randn(5, 16), explain=True)
    assert report.pairs == []
    assert all("one pair only" in c.reason for c in report.rejected) and len(report.rejected) == 2


def test_frozen_factors_are_not_found() -> None:
    model = Bottleneck(nn.Identity())
    model.down.requires_grad_(False)
    report = find_pairs(model, example_inputs=torch.randn(6, 16), explain=True)
    assert report.pairs == [] and "down.weight is frozen" in report.rejected[0].reason
    model.requires_grad_(False)
    report = find_pairs(model, example_inputs=torch.randn(6, 16), explain=True)
    assert report.pairs == [] and report.candidates == [] and report.considered == []


def test_rank_above_size_follows_the_attach_rule() -> None:
    class Head(nn.Module):  # r = 6 > n = 3: a 3-label head
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(6, 16))
            self.B = nn.Parameter(torch.randn(3, 6))
            self.A2 = nn.Parameter(torch.randn(2, 16))
            self.B2 = nn.Parameter(torch.zeros(3, 2))

        def forward(self, x):
            return x @ self.A.T @ self.B.T + x @ self.A2.T @ self.B2.T

    model = Head()
    x = torch.randn(8, 16)
    assert [p.shape for p in find_pairs(model, example_inputs=x)] == [(6, 16, 3), (2, 16, 3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="rank exceeds the layer's size"):
        handle = reflora.attach(opt, model, example_inputs=x)
    assert [p.shape for p in handle.pairs] == [(2, 16, 3)]


# ------------------------------------------------------------------------------ 5. agreement

FAMILY_PARAMS = [
    pytest.param(build, id=name, marks=pytest.mark.skipif(not has(*deps), reason=f"needs {', '.join(deps)}"))
    for name, (build, deps) in FAMILIES.items()
]


@pytest.mark.parametrize("build", FAMILY_PARAMS)
def test_traced_agrees_with_the_structural_finders(build) -> None:
    case = build()
    structural = find_pairs(case.model)
    report = trace_pairs(case.model, case.example_inputs)
    key = lambda ps: sorted((p.name, id(p.A), id(p.B), p.layout, p.experts) for p in ps)  # noqa: E731
    assert key(report.traced) == key(structural)
    assert report.unpaired.keys() <= {"head.weight"}  # pyg's trainable classifier is no factor
    # structural finders stay first: with example inputs nothing is left for tracing
    both = find_pairs(case.model, example_inputs=case.example_inputs, explain=True)
    assert key(both.structural) == key(structural) and both.traced == []


# ------------------------------------------------------------------------- 6. cost, MoE routing


def test_attach_traces_once_and_adds_nothing_per_step(monkeypatch) -> None:
    calls = []
    original = ProposalMode.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(ProposalMode, "__torch_dispatch__", counting)
    torch.manual_seed(0)
    model = tm.TorchtuneStyleMLP()
    x = torch.randn(4, 5, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    t0 = time.perf_counter()
    handle = reflora.attach(opt, model, example_inputs=x)
    attach_s = time.perf_counter() - t0
    traced = len(calls)
    assert traced > 0 and [p.name for p in handle.pairs] == ["w1", "w2"]
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before
    explicit = reflora.attach(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                              find_pairs(model, example_inputs=x))
    assert [(p.A, p.B, p.layout) for p in explicit.pairs] == [(p.A, p.B, p.layout) for p in handle.pairs]
    explicit.remove()
    calls.clear()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert calls == [] and handle.step_count == 3  # no tracing after attach
    assert attach_s < 10


def test_moe_experts_not_routed_to_are_reported() -> None:
    class SeparateExperts(nn.Module):  # one LoRA module per expert; the router never picks expert 2
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(tm.TorchtuneLoRALinear(8, 8, rank=2, alpha=2) for _ in range(3))
            for e in self.experts:
                e.weight.requires_grad_(False)

        def forward(self, x):
            route = (x[:, 0] > 0).long()  # experts 0 and 1 only
            y = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                idx = (route == e).nonzero().squeeze(-1)
                if idx.numel():
                    y[idx] = expert(x[idx])
            return y

    report = find_pairs(SeparateExperts(), example_inputs=_tokens(), explain=True)
    assert [p.name for p in report.traced] == ["experts.0", "experts.1"]
    assert set(report.unpaired) == {"experts.2.lora_a.weight", "experts.2.lora_b.weight"}
    assert all("not used by the forward pass" in why for why in report.unpaired.values())
    assert "MoE expert" in str(report)


# ------------------------------------------------------------------------- explain and errors


def test_explain_report_lists_considered_found_rejected() -> None:
    model = tm.Arbitrary()
    report = find_pairs(model, example_inputs=torch.randn(4, 16), explain=True)
    text = str(report)
    for needle in ("traced discovery considered 6", "found by tracing and verified: 3", "rejected proposals",
                   "sandwich"):
        assert needle in text, text
    # y (right's output) feeds alpha but also the residual: proposed, then rejected
    assert any((c.A, c.B) == ("right", "sandwich.alpha.weight") for c in report.rejected)
    assert all(c.pair is not None for c in report.candidates if c.found)
    no_inputs = find_pairs(nn.Linear(3, 3), explain=True)
    assert no_inputs.pairs == [] and "pass example_inputs=" in str(no_inputs)


def test_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4), nn.Dropout(0.5), Transposed())
    model[3].A = nn.Parameter(torch.randn(4, 4))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    find_pairs(model, example_inputs=torch.randn(6, 8), explain=True)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: find_pairs(Transposed(), example_inputs="x"), TypeError, "example_inputs must be a tensor"),
        (lambda: find_pairs(Transposed(), example_inputs={1: torch.ones(1)}), TypeError, "str keys"),
        (lambda: find_pairs(Transposed(), example_inputs=torch.ones(2, 3)), RuntimeError,
         r"could not run Transposed.forward on example_inputs: RuntimeError: .*shapes cannot be multiplied"),
        (lambda: find_pairs(Transposed(), explain=1), TypeError, "explain must be a bool"),
        (lambda: trace_pairs("model", torch.ones(1)), TypeError, "model must be a torch.nn.Module; got str"),
        (lambda: reflora.attach(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1),
                                [(torch.ones(2, 3), torch.ones(3, 2))], example_inputs=torch.ones(1)),
         TypeError, "example_inputs= is for finding pairs in a model"),
    ],
)
def test_traced_discovery_bad_input(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_nothing_found_names_example_inputs() -> None:
    with pytest.raises(NoPairsFoundError, match="pass example_inputs="):
        find_pairs(nn.Linear(3, 3))


def test_docs_page_python_blocks_run(monkeypatch, capsys) -> None:
    """docs/finding-pairs.md: every python block runs (torchtune's layer from traced_models when
    torchtune is not installed) and the explain output shown is what explain prints."""
    import re
    import sys
    import types
    from pathlib import Path

    import reflora.adapters as adapters

    text = (Path(__file__).resolve().parents[2] / "docs" / "finding-pairs.md").read_text()
    if not importlib.util.find_spec("torchtune"):
        peft = types.ModuleType("torchtune.modules.peft")
        peft.LoRALinear = tm.TorchtuneLoRALinear
        for name, mod in {"torchtune": types.ModuleType("torchtune"), "torchtune.modules": types.ModuleType("x"),
                          "torchtune.modules.peft": peft}.items():
            monkeypatch.setitem(sys.modules, name, mod)
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 4
    try:
        for block in blocks:
            exec(compile(block, "finding-pairs.md", "exec"), {})
    finally:
        if "updown" in dict(adapters.list_finders()):
            adapters.unregister_finder("updown")
    printed = capsys.readouterr().out
    assert "[('w1', (8, 64, 128)), ('w2', (8, 128, 64))]" in printed
    shown = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    number = re.compile(r"relative [0-9.e-]+ >")  # depends on the random weights
    assert number.sub("relative x >", printed.strip()).endswith(number.sub("relative x >", shown.strip()))


def test_traced_module_docstring_example() -> None:
    import doctest

    import reflora.adapters.traced as traced

    result = doctest.testmod(traced, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_structural_pairs_first_then_traced_ones() -> None:
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.tt = tm.TorchtuneLoRALinear(16, 16, rank=2, alpha=2)  # traced
            self.tt.weight.requires_grad_(False)
            self.owned = nn.Module()  # loralib-style names: the owned_factors finder
            self.owned.lora_A = nn.Parameter(torch.randn(3, 16))
            self.owned.lora_B = nn.Parameter(torch.zeros(16, 3))

        def forward(self, x):
            h = self.tt(x)
            return h + h @ self.owned.lora_A.T @ self.owned.lora_B.T

    model = Mixed()
    report = find_pairs(model, example_inputs=torch.randn(4, 16), explain=True)
    assert [p.name for p in report.structural] == ["owned"] and [p.name for p in report.traced] == ["tt"]
    assert [p.name for p in report.pairs] == ["owned", "tt"]
    assert report.considered == ["tt.lora_a.weight", "tt.lora_b.weight"]  # owned's factors were claimed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_low_and_high_precision(dtype) -> None:
    torch.manual_seed(0)
    assert len(find_pairs(ChainedLinear().to(dtype), example_inputs=torch.randn(5, 16, dtype=dtype))) == 2
    report = find_pairs(Bottleneck(nn.ReLU()).to(dtype), example_inputs=torch.randn(5, 16, dtype=dtype), explain=True)
    assert report.pairs == [] and len(report.rejected) == 1


def test_3d_expert_parameters_have_no_layout_and_say_so() -> None:
    class Experts3D(nn.Module):  # (E, r, m) / (E, n, r): reflora.pairs has no layout for 3-D stacks
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(3, 2, 8))
            self.B = nn.Parameter(torch.randn(3, 6, 2))

        def forward(self, x):
            route = x[:, 0].abs().mul(10).long() % 3
            return torch.stack([x[t] @ self.A[e].T @ self.B[e].T for t, e in enumerate(route.tolist())])

    report = find_pairs(Experts3D(), example_inputs=_tokens(12), explain=True)
    assert report.pairs == [] and "no layout fits" in report.rejected[0].reason


# ------------------------------------------------------- trainable tensors between the factors


class _GateBetween(nn.Module):
    """``B diag(g) A`` with a trainable per-rank gate initialised to ones (SoRA-style)."""

    def __init__(self, trainable: bool = True, init=torch.ones) -> None:
        super().__init__()
        self.base = nn.Linear(16, 8).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(4, 16) / 4)
        self.B = nn.Parameter(torch.zeros(8, 4))
        self.g = nn.Parameter(init(4), requires_grad=trainable)

    def forward(self, x):
        return self.base(x) + ((x @ self.A.T) * self.g) @ self.B.T


class _BiasedDown(nn.Module):
    """``up(down(x))`` with a zero-initialised trainable bias on the down projection (HF's
    ``_init_weights`` zeroes biases), as a Linear or as a conv."""

    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        if conv:
            self.down, self.up = nn.Conv2d(3, 2, 3, bias=True), nn.Conv2d(2, 6, 1, bias=False)
        else:
            self.down, self.up = nn.Linear(16, 4, bias=True), nn.Linear(4, 8, bias=False)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


class _ScaleBetween(nn.Module):
    """A scale between the factors: a frozen scalar, a frozen per-rank vector, or a trainable scalar."""

    def __init__(self, value: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(4, 16) / 4)
        self.B = nn.Parameter(torch.randn(8, 4) / 2)
        self.s = nn.Parameter(value, requires_grad=trainable)

    def forward(self, x):
        return ((x @ self.A.T) * self.s) @ self.B.T


NEUTRAL_BETWEEN = {
    "gate-ones": (_GateBetween, lambda: torch.randn(5, 16), "g"),
    "linear-zero-bias": (_BiasedDown, lambda: torch.randn(5, 16), "down.bias"),
    "conv-zero-bias": (lambda: _BiasedDown(conv=True), lambda: torch.randn(2, 3, 6, 6), "down.bias"),
}


@pytest.mark.parametrize("name", list(NEUTRAL_BETWEEN))
def test_a_neutral_trainable_tensor_between_the_factors_is_rejected(name) -> None:
    """Neutral at discovery (ones, zeros), so a check that randomised only the two factors passed;
    once training moves it, every refactor changes the outputs. Verification perturbs it."""
    build, inputs, between = NEUTRAL_BETWEEN[name]
    torch.manual_seed(0)
    model, x = build(), inputs()
    report = find_pairs(model, example_inputs=x, explain=True)
    assert report.pairs == []
    (cand,) = report.rejected
    assert between in cand.through and "passes through the trainable" in cand.reason, cand
    assert between in str(report)
    # why: move the neutral tensor as training would, and a refactor is no longer exact
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[between].add_(0.5 * torch.randn_like(params[between]))
        for p in model.parameters():
            if p.requires_grad and p is not params[between] and p.abs().sum() == 0:
                p.normal_()  # B = 0 would hide everything
        before = model(x)
        pairs = [LoRAPair("", params[c.A], params[c.B], *_layout_of(c)) for c in [cand]]
        for p in pairs:
            A2, B2 = refactor(p.a().double(), p.b().double(), variant="full")
            p.a().copy_(A2.to(p.A.dtype))
            p.b().copy_(B2.to(p.B.dtype))
        assert (model(x) - before).norm() > 1e-3 * before.norm()


def _layout_of(cand):
    return (("flatten", "flatten"),) if "convolution" in cand.where else (("plain", "plain"),)


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda: _ScaleBetween(torch.tensor(2.0), trainable=False), "a frozen scalar scale"),
        (lambda: _ScaleBetween(torch.ones(4), trainable=False), "a frozen per-rank vector (never moves)"),
        (lambda: _ScaleBetween(torch.tensor(1.5), trainable=True), "a trainable scalar (commutes with any refactor)"),
        (lambda: _GateBetween(trainable=False), "a frozen gate of ones"),
    ],
)
def test_scales_a_refactor_cannot_break_are_still_found(build, why) -> None:
    model = build()
    (pair,) = find_pairs(model, example_inputs=torch.randn(5, 16))
    assert (pair.A, pair.B) == (model.A, model.B), why


def test_a_trainable_bias_after_B_is_not_between_the_factors() -> None:
    model = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 8, bias=True))
    (pair,) = find_pairs(model, example_inputs=torch.randn(5, 16))
    assert (pair.A, pair.B) == (model[0].weight, model[1].weight)


# --------------------------------------------------------------- pairs the inputs do not reach


class _TwoAdapters(nn.Module):
    """Two raw adapters; ``forward(x, which)`` runs one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.A1, self.B1 = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(8, 4))
        self.A2, self.B2 = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(8, 4))

    def forward(self, x, which: int = 1):
        A, B = (self.A1, self.B1) if which == 1 else (self.A2, self.B2)
        return x @ A.T @ B.T


def test_inputs_that_reach_one_of_two_adapters_warn_naming_the_other() -> None:
    with pytest.warns(reflora.UnusedPairWarning, match=r"never used trainable parameter\(s\) 'A2', 'B2'"):
        pairs = find_pairs(_TwoAdapters(), example_inputs=torch.randn(3, 16))
    assert [p.name for p in pairs] == ["A1+B1"]


class _LoRAOnBypassedLinear(nn.Module):
    """A LoRA wrapper on ``nn.MultiheadAttention.out_proj``, whose forward MHA never calls."""

    def __init__(self, use_other: bool = True) -> None:
        super().__init__()
        self.use_other = use_other
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True).requires_grad_(False)
        self.lora = nn.Module()
        self.lora.lora_A = nn.Parameter(torch.randn(4, 16))
        self.lora.lora_B = nn.Parameter(torch.zeros(16, 4))
        self.other = nn.Module()
        self.other.lora_A = nn.Parameter(torch.randn(4, 16))
        self.other.lora_B = nn.Parameter(torch.zeros(16, 4))

    def forward(self, x):
        out = self.attn(x, x, x, need_weights=False)[0]
        return out + x @ self.other.lora_A.T @ self.other.lora_B.T if self.use_other else out


def test_a_structural_pair_the_forward_pass_never_reaches_is_named() -> None:
    model = _LoRAOnBypassedLinear()
    x = torch.randn(2, 3, 16)
    with pytest.warns(reflora.UnusedPairWarning, match=r"never used pair\(s\) 'lora'"):
        pairs = find_pairs(model, example_inputs=x)
    assert [p.name for p in pairs] == ["lora", "other"]  # managed, with the warning
    report = find_pairs(model, example_inputs=x, explain=True)
    assert report.unreached == ["lora"] and "did not reach: 'lora'" in str(report)
    # no pair reached at all: an error, not a silent no-op
    with pytest.raises(NoPairsFoundError, match=r"example_inputs reach none of the 2 pair\(s\)"):
        find_pairs(_LoRAOnBypassedLinear(use_other=False), example_inputs=x)


@pytest.mark.skipif(not has("peft"), reason="needs peft")
def test_peft_lora_on_multihead_attention_out_proj_is_named() -> None:
    """PEFT wraps ``out_proj`` (an ``nn.Linear``), but ``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly: the LoRA never runs."""
    import peft

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["out_proj", "fc"]))
    with pytest.warns(reflora.UnusedPairWarning, match=r"out_proj"):
        pairs = find_pairs(model, example_inputs=torch.randn(2, 3, 16))
    assert len(pairs) == 2


def test_unrunnable_example_inputs_raise_even_when_the_finders_paired_everything() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    model[0].lora_A = nn.Parameter(torch.randn(4, 16))
    model[0].lora_B = nn.Parameter(torch.zeros(16, 4))
    assert len(find_pairs(model)) == 1
    with pytest.raises(RuntimeError, match="could not run Sequential.forward on example_inputs"):
        find_pairs(model, example_inputs=torch.randn(3, 7))


def test_a_tuple_for_a_forward_that_takes_one_tuple_gets_the_unpacking_hint() -> None:
    class TakesBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.zeros(8, 4))

        def forward(self, batch):
            x, mask = batch
            return (x @ self.A.T @ self.B.T) * mask

    x, mask = torch.randn(3, 16), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match=r"wrap it: example_inputs=\(\(x, mask\),\)"):
        find_pairs(TakesBatch(), example_inputs=(x, mask))
    assert len(find_pairs(TakesBatch(), example_inputs=((x, mask),))) == 1


def test_root_level_pairs_are_named_after_their_factors() -> None:
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.randn(4, 16))
            self.lora_B = nn.Parameter(torch.zeros(8, 4))

    assert [p.name for p in find_pairs(Root())] == ["lora_A+lora_B"]
    assert [p.name for p in find_pairs(Transposed(), example_inputs=torch.randn(5, 16))] == ["A+B"]


@pytest.mark.compile
@pytest.mark.slow
def test_a_compiled_model_is_traced_to_the_same_pairs() -> None:
    torch._dynamo.reset()
    model, x = tm.TorchtuneStyleMLP(), torch.randn(4, 16)
    eager = [(p.name, p.shape, p.layout) for p in find_pairs(model, example_inputs=x)]
    compiled = [(p.name, p.shape, p.layout) for p in find_pairs(torch.compile(model, backend="aot_eager"), example_inputs=x)]
    assert compiled == eager and len(eager) == 2
