"""MoE expert LoRA (issue 8, item 1): PEFT's ``ParamWrapper`` stacks ``E`` experts' factors in one
``lora_A`` ``(E * r, in)`` and one ``lora_B`` ``(out, r * E)``; every expert must be its own pair.

Models: a tiny Mixtral (``target_modules="all-linear"``; PEFT swaps in/out for its (E, out, in)
experts) and a tiny GPT-OSS (``target_parameters`` on the experts; (E, in, out), no swap), both
built from configs in ``discovery_models``; and a synthetic expert stack checked against the same
experts as separate 2-D pairs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reflora
from reflora import LoRAPair
from reflora.adapters import find_pairs
from reflora.functional import precondition, refactor

from attach_helpers import MODE_IDS, MODES
from discovery_models import gpt_oss, has, mixtral, MOE_EXPERTS

needs_hf = pytest.mark.skipif(not has("transformers", "peft"), reason="needs transformers and peft")
FAMILIES = {"mixtral": mixtral, "gpt-oss": gpt_oss}
OPTS = {
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def _per_expert_rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative error over experts (a small expert cannot hide behind a big one)."""
    err = (x - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp_min(1e-30)
    return err.max().item()


def _expert_pairs(pairs):
    return [p for p in pairs if p.experts > 1]


def _randomise(pairs, seed=7):
    """Random A and nonzero B (PEFT's B = 0 would make every refactor a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pairs:
            a, b = p.a(), p.b()
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[-1] ** 0.5)
            b.copy_(0.3 * torch.randn(b.shape, generator=g) / b.shape[-1] ** 0.5)


def _peft_delta(pair: LoRAPair) -> torch.Tensor:
    """PEFT's own merged update of a ParamWrapper, per expert: ``(E, in, out)`` or ``(E, out, in)``."""
    return pair.module.get_delta_weight("default").detach().clone()


# ------------------------------------------------------------------------------- discovery


@needs_hf
def test_which_modules_peft_wraps_as_expert_param_wrappers() -> None:
    from peft.tuners.lora.layer import Linear, ParamWrapper

    mods = dict(mixtral().model.named_modules())
    pre = "base_model.model.model.layers.0.mlp"
    assert isinstance(mods[f"{pre}.experts"], ParamWrapper) and mods[f"{pre}.experts"].parameter_name == "down_proj"
    inner = mods[f"{pre}.experts.base_layer"]
    assert isinstance(inner, ParamWrapper) and inner.parameter_name == "gate_up_proj"  # nested
    assert mods[f"{pre}.experts"].num_experts == inner.num_experts == MOE_EXPERTS
    assert mods[f"{pre}.experts"]._did_swap_in_out_features  # Mixtral stores (E, out, in)
    assert isinstance(mods[f"{pre}.gate"], ParamWrapper) and mods[f"{pre}.gate"].num_experts == 1  # router

    mods = dict(gpt_oss().model.named_modules())
    assert isinstance(mods["base_model.model.model.layers.0.self_attn.q_proj"], Linear)
    outer, inner = mods[f"{pre}.experts"], mods[f"{pre}.experts.base_layer"]
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    assert outer.num_experts == inner.num_experts == MOE_EXPERTS
    assert not outer._did_swap_in_out_features  # GPT-OSS stores (E, in, out): no swap


@needs_hf
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_pairs_are_views_matching_peft(family) -> None:
    case = FAMILIES[family]()
    pairs = find_pairs(case.model)
    assert {p.name: p.shape for p in pairs} == case.expected
    experts = {p.name for p in pairs if p.experts > 1}
    assert experts == {n for n in case.expected if n.endswith((".experts.default", ".experts.base_layer.default"))}
    _randomise(pairs)
    for p in pairs:
        if p.experts == 1:
            assert p.layout == ("plain", "plain")
            continue
        E, (r, m, n) = p.experts, p.shape
        assert E == MOE_EXPERTS and p.layout == ("expert_rows", "expert_cols")
        a, b = p.a(), p.b()
        assert a.shape == (E, r, m) and b.shape == (E, n, r) and p.delta().shape == (E, n, m)
        # views, no copies: same storage, and exactly PEFT's own reshapes
        assert a.untyped_storage().data_ptr() == p.A.untyped_storage().data_ptr()
        assert b.untyped_storage().data_ptr() == p.B.untyped_storage().data_ptr()
        assert torch.equal(a, p.A.reshape(E, -1, p.A.shape[-1]))
        assert torch.equal(b, p.B.reshape(p.B.shape[0], -1, E).permute(2, 0, 1))
        # PEFT's merged update is scaling * B_e A_e, transposed when it did not swap in/out
        dw = _peft_delta(p)
        mine = p.module.scaling["default"] * p.delta()
        assert torch.allclose(dw, mine if p.module._did_swap_in_out_features else mine.mT, atol=1e-6)
        # writes through the view land in the parameter, in expert e's rows / columns
        with torch.no_grad():
            a[1].zero_()
            b[2].zero_()
        assert not p.A[r : 2 * r].any() and p.A[:r].any()
        assert not p.B[:, 2::E].any() and p.B[:, 1::E].any()


# ------------------------------------------------------------------------------- attach, PEFT models


def _step(case, opt) -> None:
    opt.zero_grad()
    case.loss(case.model).backward()
    opt.step()


@needs_hf
@pytest.mark.parametrize("opt_name", OPTS)
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lr0_steps_keep_every_expert_update_and_the_logits(family, variant, space, opt_name) -> None:
    case = FAMILIES[family]()
    case.model.eval()  # no dropout: the logits must match exactly
    pairs = find_pairs(case.model)
    _randomise(pairs)
    opt = OPTS[opt_name]([p for p in case.model.parameters() if p.requires_grad], 0.0)
    handle = reflora.attach(opt, pairs, variant=variant, space=space, warmup_steps=0)
    with torch.no_grad():
        logits = case.output(case.model).clone()
    deltas = [p.delta().clone() for p in pairs]
    peft_deltas = {p.name: _peft_delta(p) for p in _expert_pairs(pairs)}
    factors = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
    for _ in range(2):  # the second step transports the state the first one created
        _step(case, opt)
    assert handle.step_count == 2
    with torch.no_grad():
        assert _rel(case.output(case.model), logits) < 1e-5
    for p, d, (A0, B0) in zip(pairs, deltas, factors):
        assert _per_expert_rel(p.delta(), d if p.experts > 1 else d[None]) < 1e-5, p.name
        if p.experts > 1:
            assert _per_expert_rel(_peft_delta(p), peft_deltas[p.name]) < 1e-5, p.name
            if space == "parameter":  # it did refactor, else this test would prove nothing
                assert _rel(p.A.detach(), A0) > 1e-2 and _rel(p.B.detach(), B0) > 1e-2, p.name
            else:
                assert torch.equal(p.A, A0) and torch.equal(p.B, B0)


def _snapshot(pairs):
    return [(p.a().detach().clone(), p.b().detach().clone(), p.grad_a().clone(), p.grad_b().clone())
            for p in _expert_pairs(pairs)]


@needs_hf
@pytest.mark.parametrize("variant", ["full", "scalar"])
def test_parameter_space_refactors_each_expert_alone(variant) -> None:
    case = mixtral()
    pairs = find_pairs(case.model)
    _randomise(pairs)
    opt = torch.optim.SGD([p for p in case.model.parameters() if p.requires_grad], lr=0.0)
    reflora.attach(opt, pairs, variant=variant, space="parameter", warmup_steps=0)
    opt.zero_grad()
    case.loss(case.model).backward()
    before = _snapshot(pairs)
    opt.step()  # lr = 0: the factors and gradients are now the refactored ones
    for p, (A, B, gA, gB) in zip(_expert_pairs(pairs), before):
        for e in range(p.experts):
            A2, B2, gA2, gB2 = refactor(A[e], B[e], (gA[e], gB[e]), variant=variant)
            a, b, ga, gb = p.a()[e], p.b()[e], p.grad_a()[e], p.grad_b()[e]
            tol = dict(rtol=1e-4, atol=1e-5 * float(A2.norm() * B2.norm()))
            # canonical up to the eigenvectors' signs: compare the balanced Grams and the product
            assert torch.allclose(a @ a.mT, A2 @ A2.mT, **tol) and torch.allclose(b.mT @ b, B2.mT @ B2, **tol)
            assert torch.allclose(b @ a, B[e] @ A[e], **tol)
            # and after aligning those signs, the factors and their gradients themselves
            d = torch.sign((a * A2).sum(-1))
            assert torch.allclose(a, d[:, None] * A2, rtol=1e-4, atol=1e-5)
            assert torch.allclose(b, B2 * d, rtol=1e-4, atol=1e-5)
            assert torch.allclose(ga, d[:, None] * gA2, rtol=1e-4, atol=1e-6)
            assert torch.allclose(gb, gB2 * d, rtol=1e-4, atol=1e-6)


@needs_hf
@pytest.mark.parametrize("variant", ["full", "scalar"])
def test_gradient_space_preconditions_each_expert_alone(variant) -> None:
    case = gpt_oss()
    pairs = find_pairs(case.model)
    _randomise(pairs)
    opt = torch.optim.SGD([p for p in case.model.parameters() if p.requires_grad], lr=0.0)
    handle = reflora.attach(opt, pairs, variant=variant, space="gradient", interval=2, warmup_steps=0)
    for step in range(2):  # step 0 computes S per expert; step 1 applies the cached (E, r, r) S
        opt.zero_grad()
        case.loss(case.model).backward()
        before = _snapshot(pairs)
        opt.step()
        for p, (A, B, gA, gB) in zip(_expert_pairs(pairs), before):
            for e in range(p.experts):
                want_A, want_B = precondition(A[e], B[e], gA[e], gB[e], variant=variant)
                assert torch.allclose(p.grad_a()[e], want_A, rtol=1e-4, atol=1e-7), (p.name, e, step)
                assert torch.allclose(p.grad_b()[e], want_B, rtol=1e-4, atol=1e-7), (p.name, e, step)
    r = 1 if variant == "scalar" else None
    for i, p in enumerate(pairs):
        S, S_inv = handle.cached_metrics[i]
        assert S.shape == S_inv.shape == ((p.experts,) if p.experts > 1 else ()) + ((r or p.rank),) * 2


@needs_hf
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_training_mixtral_lowers_the_loss_and_resumes_from_a_checkpoint(variant, space) -> None:
    case = mixtral()
    case.model.train()
    opt = torch.optim.AdamW([p for p in case.model.parameters() if p.requires_grad], lr=1e-2)
    handle = reflora.attach(opt, case.model, variant=variant, space=space, interval=2, warmup_steps=0)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = case.loss(case.model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    saved = copy.deepcopy((case.model.state_dict(), opt.state_dict(), handle.state_dict()))
    twin = mixtral()
    twin.model.train()
    twin.model.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW([p for p in twin.model.parameters() if p.requires_grad], lr=1e-2)
    handle2 = reflora.attach(opt2, twin.model, variant=variant, space=space, interval=2, warmup_steps=0)
    opt2.load_state_dict(saved[1])
    handle2.load_state_dict(saved[2])
    for _ in range(2):  # one step from the cache (gradient space), one that recomputes
        for c, o in ((case, opt), (twin, opt2)):
            _step(c, o)
    for p, q in zip(handle.pairs, handle2.pairs):
        assert torch.allclose(p.A, q.A, atol=1e-6) and torch.allclose(p.B, q.B, atol=1e-6), p.name


@needs_hf
def test_adafactor_cannot_follow_a_per_expert_refactor() -> None:
    case = gpt_oss()
    _randomise(find_pairs(case.model))
    params = [p for p in case.model.parameters() if p.requires_grad]
    opt = torch.optim.Adafactor(params, lr=1e-2)
    handle = reflora.attach(opt, case.model, space="parameter", warmup_steps=0)
    _step(case, opt)  # no state yet: nothing to transport
    before = [p.detach().clone() for p in params]
    with pytest.raises(reflora.UnsupportedOptimizerError, match="Adafactor .* not per expert.* space='gradient'"):
        _step(case, opt)
    # refused before anything moved: no half-refactored model
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    # and refused at attach time once the optimizer holds state
    handle.remove()
    with pytest.raises(reflora.UnsupportedOptimizerError, match="not per expert"):
        reflora.attach(opt, case.model, space="parameter")
    opt = torch.optim.Adafactor(params, lr=1e-2)
    reflora.attach(opt, case.model, space="gradient")
    for _ in range(2):
        _step(case, opt)


# ------------------------------------------------------------------------------- synthetic: stacked vs split


class ExpertNet(nn.Module):
    """``E`` experts' factors stacked as PEFT does, or the same experts as separate 2-D pairs.

    Loss: ``sum_e mean((X_e (B_e A_e)^T - T_e)^2)``. Both forms hold the same numbers, so RefLoRA
    on the stack must follow exactly the trajectory of RefLoRA on the split pairs.
    """

    def __init__(self, stacked: bool, E=3, r=2, m=6, n=5, seed=0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        A = torch.randn(E, r, m, generator=g, dtype=dt) / m**0.5
        B = torch.randn(E, n, r, generator=g, dtype=dt) * torch.tensor([0.1, 1.0, 5.0], dtype=dt)[:, None, None]
        self.X = torch.randn(E, 16, m, generator=g, dtype=dt)
        self.T = torch.randn(E, 16, n, generator=g, dtype=dt)
        self.E, self.stacked = E, stacked
        if stacked:
            self.A = nn.Parameter(A.reshape(E * r, m))  # lora_A: (E * r, m)
            self.B = nn.Parameter(B.permute(1, 2, 0).reshape(n, r * E))  # lora_B: (n, r * E)
            self.pairs = [LoRAPair("experts", self.A, self.B, ("expert_rows", "expert_cols"), experts=E)]
        else:
            self.As = nn.ParameterList([nn.Parameter(a.clone()) for a in A])
            self.Bs = nn.ParameterList([nn.Parameter(b.clone()) for b in B])
            self.pairs = [LoRAPair(f"e{e}", a, b) for e, (a, b) in enumerate(zip(self.As, self.Bs))]

    def products(self) -> torch.Tensor:
        if self.stacked:
            return self.pairs[0].b() @ self.pairs[0].a()
        return torch.stack([b @ a for a, b in zip(self.As, self.Bs)])

    def loss(self) -> torch.Tensor:
        return (self.X @ self.products().mT - self.T).square().mean((-2, -1)).sum()


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("opt_name", OPTS)
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_stacked_experts_follow_the_split_pairs_exactly(variant, space, opt_name, interval) -> None:
    """Grouping, per-expert norms (scalar), per-expert S, the (E, r, r) cache and the optimizer
    state transport through the views: the expert stack is E independent pairs. (The products
    are compared: they do not depend on the eigenvectors' signs.)"""
    runs = []
    for stacked in (True, False):
        net = ExpertNet(stacked)
        opt = OPTS[opt_name](list(net.parameters()), 0.05 if opt_name == "SGD" else 1e-2)
        handle = reflora.attach(opt, net.pairs, variant=variant, space=space, interval=interval)
        assert handle.num_groups == 1
        for _ in range(5):
            opt.zero_grad()
            net.loss().backward()
            opt.step()
        runs.append(net.products().detach())
    assert torch.allclose(runs[0], runs[1], rtol=1e-9, atol=1e-11)
    start = ExpertNet(True).products().detach()
    assert _rel(runs[0], start) > 1e-2  # it trained


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_large_expert_stacks_take_the_per_pair_path_too(monkeypatch, variant, space) -> None:
    """Above ``STACK_MAX_NUMEL`` the Grams and transforms run per pair on the (E, ., .) views."""
    import reflora.step

    monkeypatch.setattr(reflora.step, "STACK_MAX_NUMEL", 0)
    test_stacked_experts_follow_the_split_pairs_exactly(variant, space, "AdamW", 1)
