"""reflora.func: equal to reflora.attach and to torch.optim, vmapped ensembles, compile, bad input.

Everything in float64 so that "equal" means 1e-6 relative, not "close".
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import reflora
from reflora.adapters import NoPairsFoundError
from reflora.func import ParamPair, adamw, pairs_of, sgd
from reflora.pairs import LAYOUTS, LoRAPair, from_core, to_core

MODES = [("full", "gradient"), ("scalar", "gradient"), ("full", "parameter"), ("scalar", "parameter")]
MODE_IDS = [f"{v}-{s}" for v, s in MODES]
SCHEDULES = [(0, 1), (1, 2)]  # (warmup_steps, interval): ungated, and gated with a cached metric
STEPS = 6
HAS_PEFT = importlib.util.find_spec("peft") is not None

# the same hyperparameters for torch.optim and reflora.func
OPTS = {
    "adamw": (dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW, adamw),
    "sgd": (dict(lr=0.05, momentum=0.9, weight_decay=0.01), torch.optim.SGD, sgd),
}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


# --------------------------------------------------------------------------- models


class LoRALinear(nn.Module):
    """loralib style (found by the owned_factors finder); B random so RefLoRA acts from step 0."""

    def __init__(self, m: int, n: int, r: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m, generator=g, dtype=torch.float64) / m**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, m, generator=g, dtype=torch.float64) / m**0.5)
        self.lora_B = nn.Parameter(0.1 * torch.randn(n, r, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.lora_B @ self.lora_A).T


class RawNet(nn.Module):
    """Three pairs of two shapes (two groups) and a trainable head that is not a pair."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = LoRALinear(12, 10, 3, g)
        self.l2 = LoRALinear(10, 10, 3, g)
        self.l3 = LoRALinear(10, 10, 3, g)
        self.head = nn.Linear(10, 4, dtype=torch.float64)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(4, 10, generator=g, dtype=torch.float64) / 10**0.5)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


def raw_case(seed: int = 0):
    g = torch.Generator().manual_seed(100)
    x, y = torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
    return RawNet(seed), (x,), y


class PeftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv1d(10, 10, 3, padding=1)
        self.head = nn.Linear(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(ids)))
        return self.head(torch.tanh(self.conv(h.mT)).mean(-1))


_PEFT = {}


def peft_case():
    """A PEFT LoRA model: Embedding (roles swapped by discovery), Linear, Conv1d (flattened
    layout), and a modules_to_save head; init_lora_weights=False so that B != 0."""
    if "case" not in _PEFT:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        cfg = LoraConfig(r=3, target_modules=["emb", "lin", "conv"], modules_to_save=["head"], init_lora_weights=False)
        model = get_peft_model(PeftNet().double(), cfg)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 16, (8, 5), generator=g)
        _PEFT["case"] = (model, (ids,), torch.randn(8, 4, generator=g, dtype=torch.float64))
    return _PEFT["case"]


CASES = {"raw": raw_case, "peft": peft_case}


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def run_torch(case, opt_name: str, steps: int, attach: dict | None = None, lr_at: dict | None = None):
    model, args, y = case
    model = copy.deepcopy(model)
    hyper, torch_cls, _ = OPTS[opt_name]
    opt = torch_cls([p for p in model.parameters() if p.requires_grad], **hyper)
    if attach is not None:
        reflora.attach(opt, model, **attach)
    for t in range(steps):
        if lr_at and t in lr_at:
            for group in opt.param_groups:
                group["lr"] = lr_at[t]
        opt.zero_grad()
        (model(*args) - y).square().mean().backward()
        opt.step()
    return trainable(model), opt, model


def loss_fn(case):
    model, args, y = case
    return lambda p: (functional_call(model, p, args) - y).square().mean()


def run_func(case, opt, steps: int, lr_at: dict | None = None):
    params = trainable(case[0])
    state = opt.init(params)
    g = grad(loss_fn(case))
    for t in range(steps):
        if lr_at and t in lr_at:
            state = {**state, "lr": torch.tensor(lr_at[t], dtype=torch.float64)}
        params, state = opt.update(g(params), state, params)
    return params, state


# --------------------------------------------------------------------------- discovery


def test_pairs_of_names_the_discovered_pairs() -> None:
    model = RawNet()
    pairs = pairs_of(model)
    assert [p.name for p in pairs] == ["l1", "l2", "l3"]
    assert pairs[0] == ParamPair("l1.lora_A", "l1.lora_B", ("plain", "plain"), 1, "l1")
    names = {k for p in pairs for k in (p.A, p.B)}
    assert "head.weight" not in names and names <= dict(model.named_parameters()).keys()


@pytest.mark.skipif(not HAS_PEFT, reason="needs peft")
def test_pairs_of_peft_layouts() -> None:
    pairs = {p.name: p for p in pairs_of(peft_case()[0])}
    assert set(pairs) == {f"base_model.model.{m}.default" for m in ("emb", "lin", "conv")}
    assert pairs["base_model.model.conv.default"].layout == ("flatten", "flatten")
    assert pairs["base_model.model.emb.default"].A == "base_model.model.emb.lora_embedding_A.default"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_core_inverts_to_core(layout: str) -> None:
    t = torch.randn(6, 4, 3) if layout == "flatten" else torch.randn(6, 4)
    core = to_core(t, layout, 2)
    back = from_core(core.clone(), layout, t.shape, 2)  # from a copy: no view of t involved
    assert back.shape == t.shape and torch.equal(back, t)


# --------------------------------------------------------------------------- equal to attach


# the raw model on both schedules, the (slower) PEFT model on the gated one
ATTACH_CASES = [
    pytest.param(case, opt, v, s, w, i, id=f"{case}-{opt}-{v}-{s}-{'every-step' if i == 1 else 'warmup1-interval2'}")
    for case, schedules in (("raw", SCHEDULES), ("peft", SCHEDULES[1:]))
    for opt in OPTS
    for v, s in MODES
    for w, i in schedules
]


@pytest.mark.parametrize("case_name, opt_name, variant, space, warmup, interval", ATTACH_CASES)
def test_matches_attach(case_name, opt_name, variant, space, warmup, interval) -> None:
    if case_name == "peft" and not HAS_PEFT:
        pytest.skip("needs peft")
    case = CASES[case_name]()
    kw = dict(variant=variant, space=space, warmup_steps=warmup, interval=interval)
    want, _, _ = run_torch(case, opt_name, STEPS, attach=kw)
    hyper, _, make = OPTS[opt_name]
    got, state = run_func(case, make(pairs_of(case[0]), **hyper, **kw), STEPS)
    assert_same(got, want)
    assert int(state["step"]) == STEPS
    # RefLoRA changed the run (this test could fail): far from the plain optimizer's result
    # (AdamW with RefLoRA-S in gradient space every step differs only through Adam's eps: 8e-4)
    if (case_name, opt_name) not in _PLAIN:
        _PLAIN[case_name, opt_name] = run_func(case, make(None, **hyper), STEPS)[0]
    assert max_rel_diff(got, _PLAIN[case_name, opt_name]) > 1e-4


_PLAIN: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize(
    "kw",
    [
        dict(space="parameter", second_moment="keep"),
        dict(space="parameter", second_moment="reset", warmup_steps=1, interval=2),
        dict(space="parameter", frame="symmetric"),
        dict(space="parameter", amsgrad=True),
        dict(space="gradient", solver="newton_schulz", interval=3),
    ],
    ids=["keep", "reset", "symmetric-frame", "amsgrad", "newton-schulz"],
)
def test_rules_frames_solvers_match_attach(kw) -> None:
    case = raw_case()
    hyper = dict(lr=1e-2, weight_decay=0.1, amsgrad=kw.pop("amsgrad", False))
    model, args, y = case
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **hyper)
    reflora.attach(opt, model, **kw)
    for _ in range(STEPS):
        opt.zero_grad()
        (model(*args) - y).square().mean().backward()
        opt.step()
    got, _ = run_func(case, adamw(pairs_of(case[0]), **hyper, **kw), STEPS)
    assert_same(got, trainable(model))


class LayoutNet(nn.Module):
    """A pair stored transposed and an MoE pair of 2 experts (PEFT's expert_rows / expert_cols)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        r, d, E = 3, 8, 2
        self.At = nn.Parameter(torch.randn(d, r, generator=g, dtype=torch.float64) / d**0.5)  # A^T
        self.Bt = nn.Parameter(0.3 * torch.randn(r, d, generator=g, dtype=torch.float64))  # B^T
        self.eA = nn.Parameter(torch.randn(E * r, d, generator=g, dtype=torch.float64) / d**0.5)
        self.eB = nn.Parameter(0.3 * torch.randn(d, r * E, generator=g, dtype=torch.float64))
        self.E = E

    def layouts(self):
        return [
            (self.At, self.Bt, ("transposed", "transposed"), 1),
            (self.eA, self.eB, ("expert_rows", "expert_cols"), self.E),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ (self.Bt.T @ self.At.T).T)
        A = to_core(self.eA, "expert_rows", self.E)
        B = to_core(self.eB, "expert_cols", self.E)
        return torch.stack([h @ (B[e] @ A[e]).T for e in range(self.E)]).sum(0)


@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_stored_layouts_and_experts_match_attach(space) -> None:
    net = LayoutNet()
    g = torch.Generator().manual_seed(4)
    case = (net, (torch.randn(16, 8, generator=g, dtype=torch.float64),), torch.randn(16, 8, generator=g, dtype=torch.float64))
    names = {id(p): n for n, p in net.named_parameters()}
    model = copy.deepcopy(net)
    lora = [LoRAPair(f"p{i}", A, B, lay, experts=E) for i, (A, B, lay, E) in enumerate(model.layouts())]
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2)
    reflora.attach(opt, lora, space=space, interval=2)
    for _ in range(STEPS):
        opt.zero_grad()
        (model(*case[1]) - case[2]).square().mean().backward()
        opt.step()
    pairs = [ParamPair(names[id(A)], names[id(B)], lay, E) for A, B, lay, E in net.layouts()]
    got, _ = run_func(case, adamw(pairs, lr=1e-2, space=space, interval=2), STEPS)
    assert_same(got, trainable(model))
    plain, _ = run_func(case, adamw(None, lr=1e-2), STEPS)
    assert max_rel_diff(got, plain) > 1e-3


@pytest.mark.parametrize("mode", ["skip", "act"])
def test_rank_above_size_matches_attach(mode) -> None:
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(LoRALinear(12, 10, 3, g), nn.Tanh(), LoRALinear(10, 2, 3, g))  # r = 3 > n = 2
    case = (model, (torch.randn(32, 12, generator=g, dtype=torch.float64),), torch.randn(32, 2, generator=g, dtype=torch.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want, _, _ = run_torch(case, "adamw", STEPS, attach=dict(space="parameter", rank_above_size=mode))
        got, _ = run_func(case, adamw(pairs_of(model), **OPTS["adamw"][0], space="parameter", rank_above_size=mode), STEPS)
    assert_same(got, want)
    skipped = [w for w in caught if "rank exceeds the layer's size" in str(w.message)]
    assert len(skipped) == (2 if mode == "skip" else 0)  # one from attach, one from init
    func_warning = [w for w in skipped if "base step" in str(w.message)]
    assert len(func_warning) == (1 if mode == "skip" else 0)
    assert ("'2'" in str(func_warning[0].message)) if func_warning else True


# --------------------------------------------------------------------------- equal to torch.optim


BASE_CASES = [
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, amsgrad=True)),
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
]


@pytest.mark.parametrize("opt_name, hyper", BASE_CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(BASE_CASES)])
@pytest.mark.parametrize("how", ["no-pairs", "long-warmup"])
def test_base_steps_match_torch_optim(opt_name, hyper, how) -> None:
    """RefLoRA out of the way (pairs=None, or a warmup longer than the run): torch.optim's step,
    its state, and a learning rate changed between steps through state["lr"]."""
    case = raw_case()
    model, args, y = copy.deepcopy(case[0]), *case[1:]
    torch_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt_name]
    opt = torch_cls([p for p in model.parameters() if p.requires_grad], **hyper)
    lr_at = {4: hyper["lr"] * 0.3}
    make = {"adamw": adamw, "sgd": sgd}[opt_name]
    fopt = make(None, **hyper) if how == "no-pairs" else make(pairs_of(case[0]), **hyper, warmup_steps=100)
    got, state = run_func(case, fopt, STEPS, lr_at=lr_at)
    for t in range(STEPS):
        if t in lr_at:
            opt.param_groups[0]["lr"] = lr_at[t]
        opt.zero_grad()
        (model(*args) - y).square().mean().backward()
        opt.step()
    assert_same(got, trainable(model))
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer") if k in state]
    assert keys == [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
                    if any(k in s and s[k] is not None for s in opt.state.values())]
    for key in keys:
        assert_same(state[key], {names[id(p)]: s[key] for p, s in opt.state.items()})
    # the lr change mattered: without it the run ends elsewhere
    unchanged, _ = run_func(case, fopt, STEPS)
    assert max_rel_diff(got, unchanged) > 1e-4


def test_update_is_pure_and_the_state_keeps_its_structure() -> None:
    case = raw_case()
    opt = adamw(pairs_of(case[0]), lr=1e-2, space="parameter", warmup_steps=1, interval=2, amsgrad=True)
    params = trainable(case[0])
    state = opt.init(params)
    g = grad(loss_fn(case))(params)
    snapshot = copy.deepcopy((params, g, state))
    structure = lambda s: {k: (v.shape, v.dtype) if torch.is_tensor(v) else {n: (t.shape, t.dtype) for n, t in v.items()}
                           for k, v in s.items()}
    for _ in range(3):
        new_params, new_state = opt.update(g, state, params)
        assert structure(new_state) == structure(state)
        assert all(not t.requires_grad for t in new_params.values())
    for before, after in zip(snapshot, (params, g, state)):
        for k in before:
            v0, v1 = before[k], after[k]
            assert all(torch.equal(v0[n], v1[n]) for n in v0) if isinstance(v0, dict) else torch.equal(v0, v1)


# --------------------------------------------------------------------------- vmap


def _stacked(models):
    P, _ = stack_module_state(models)
    params = {k: v.detach() for k, v in P.items() if models[0].get_parameter(k).requires_grad}
    frozen = {k: v.detach() for k, v in P.items() if k not in params}
    return params, frozen


@pytest.mark.parametrize(
    "make, variant, space",
    [(adamw, v, s) for v, s in MODES] + [(sgd, "full", "parameter")],
    ids=[f"adamw-{i}" for i in MODE_IDS] + ["sgd-full-parameter"],
)
def test_vmapped_ensemble_equals_separate_runs(make, variant, space) -> None:
    """N members with their own seeds and learning rates, in one vmapped program."""
    models = [raw_case(seed)[0] for seed in range(3)]
    _, (x,), y = raw_case()
    lrs = torch.tensor([3e-3, 1e-2, 3e-2], dtype=torch.float64)
    hyper = dict(momentum=0.9) if make is sgd else dict(weight_decay=0.1)
    opt = make(pairs_of(models[0]), **hyper, variant=variant, space=space, warmup_steps=1, interval=2)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, frozen):
        return (functional_call(base, {**p, **frozen}, (x,)) - y).square().mean()

    params, frozen = _stacked(models)
    state = vmap(opt.init)(params, lrs)
    for _ in range(STEPS):
        params, state = vmap(opt.update)(vmap(grad(loss))(params, frozen), state, params)
    finals = []
    for j, model in enumerate(models):
        case = (model, (x,), y)
        alone = make(pairs_of(model), **hyper, lr=float(lrs[j]), variant=variant, space=space, warmup_steps=1, interval=2)
        want, _ = run_func(case, alone, STEPS)
        assert_same({k: v[j] for k, v in params.items()}, want)
        finals.append(want)
    assert max_rel_diff(finals[0], finals[1]) > 1e-2  # the members really differ


# --------------------------------------------------------------------------- compile


@pytest.mark.compile
def test_compiled_update_matches_eager_without_recompiling() -> None:
    torch._dynamo.reset()
    case = raw_case()
    opt = adamw(pairs_of(case[0]), lr=1e-2, variant="full", space="parameter", warmup_steps=1, interval=2)
    compiled = torch.compile(opt.update, fullgraph=True, backend="aot_eager")
    g = grad(loss_fn(case))
    pe = pc = trainable(case[0])
    se = sc = opt.init(pe)
    for t in range(5):
        if t == 3:  # a new learning rate: a new value, the same graph
            se = {**se, "lr": torch.tensor(3e-3, dtype=torch.float64)}
            sc = {**sc, "lr": torch.tensor(3e-3, dtype=torch.float64)}
        pe, se = opt.update(g(pe), se, pe)
        with torch.compiler.set_stance("fail_on_recompile" if t else "default"):  # new step values too
            pc, sc = compiled(g(pc), sc, pc)
    assert_same(pc, pe)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_vmapped_sweep_with_inductor() -> None:
    """The lr-sweep use: torch.compile(vmap(update)) with the inductor backend, no recompiles."""
    torch._dynamo.reset()
    models = [raw_case(seed)[0] for seed in range(2)]
    _, (x,), y = raw_case()
    opt = sgd(pairs_of(models[0]), momentum=0.9, variant="scalar", warmup_steps=1, interval=2)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, frozen):
        return (functional_call(base, {**p, **frozen}, (x,)) - y).square().mean()

    update = vmap(opt.update)
    compiled = torch.compile(update, fullgraph=True)
    pe, frozen = _stacked(models)
    pc = pe
    se = sc = vmap(opt.init)(pe, torch.tensor([0.01, 0.05], dtype=torch.float64))
    for t in range(4):
        pe, se = update(vmap(grad(loss))(pe, frozen), se, pe)
        with torch.compiler.set_stance("fail_on_recompile" if t else "default"):
            pc, sc = compiled(vmap(grad(loss))(pc, frozen), sc, pc)
    assert_same(pc, pe)


# --------------------------------------------------------------------------- bad input


def _case_params():
    return trainable(RawNet())


BAD_CONSTRUCTION = [
    ("lr negative", lambda: adamw(None, lr=-1.0), ValueError, "lr must be >= 0.0; got -1.0"),
    ("lr a string", lambda: sgd(None, lr="0.1"), TypeError, "lr must be a float; got str"),
    ("beta2 = 1", lambda: adamw(None, betas=(0.9, 1.0)), ValueError, re.escape("betas[1] must be in [0.0, 1.0); got 1.0")),
    ("betas not a pair", lambda: adamw(None, betas=0.9), TypeError, "betas must be a"),
    ("eps negative", lambda: adamw(None, eps=-1e-8), ValueError, "eps must be >= 0.0"),
    ("weight decay negative", lambda: sgd(None, weight_decay=-0.1), ValueError, "weight_decay must be >= 0.0"),
    ("momentum negative", lambda: sgd(None, momentum=-0.5), ValueError, "momentum must be >= 0.0"),
    ("nesterov without momentum", lambda: sgd(None, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    ("amsgrad not a bool", lambda: adamw(None, amsgrad=1), TypeError, "amsgrad must be a bool; got int"),
    ("variant", lambda: adamw(None, variant="diag"), ValueError, "variant must be one of"),
    ("space", lambda: sgd(None, space="weights"), ValueError, r"space must be one of \('auto', 'gradient', 'parameter'\); got 'weights'"),
    ("warmup negative", lambda: adamw(None, warmup_steps=-1), ValueError, "warmup_steps must be >= 0; got -1"),
    ("interval zero", lambda: adamw(None, interval=0), ValueError, "interval must be >= 1; got 0"),
    ("interval float", lambda: adamw(None, interval=2.0), TypeError, "interval must be an int; got float"),
    ("second moment rule", lambda: adamw(None, second_moment="sqrt"), ValueError, "second_moment must be one of"),
    ("paper frame with newton-schulz", lambda: adamw(None, frame="paper", solver="newton_schulz"), ValueError,
     "frame='paper' needs the eigenbasis"),
    ("rank_above_size", lambda: adamw(None, rank_above_size="drop"), ValueError, "rank_above_size must be 'skip' or 'act'"),
    ("reflora eps", lambda: adamw(None, reflora_eps=2.0), ValueError, re.escape("eps must be in [0, 1); got 2.0")),
    ("no pairs", lambda: adamw([]), ValueError, "no pairs given: RefLoRA would be a silent no-op"),
    ("pairs a string", lambda: adamw("l1"), TypeError, "pairs must be an nn.Module"),
    ("pair of three", lambda: adamw([("a", "b", "c")]), TypeError, "must be a ParamPair or a"),
    ("name not a str", lambda: adamw([("a", 1)]), TypeError, "the name of B must be a str"),
    ("A is B", lambda: adamw([("a", "a")]), ValueError, "A and B are the same parameter 'a'"),
    ("shared factor", lambda: adamw([("a", "b"), ("c", "b")]), ValueError, r"pair 'c' shares its B factor with pair 'a' \(parameter 'b'\)"),
    ("bad layout", lambda: adamw([ParamPair("a", "b", ("plain", "diag"))]), ValueError, "layout must be a pair of"),
    ("model without pairs", lambda: adamw(nn.Linear(3, 3)), NoPairsFoundError,
     r"no trainable low-rank pair found in Linear: name the pairs yourself, ParamPair"),
    ("pairs_of on a tensor", lambda: pairs_of(torch.zeros(2)), TypeError, "model must be a torch.nn.Module"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in BAD_CONSTRUCTION], ids=[c[0] for c in BAD_CONSTRUCTION])
def test_bad_construction(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def _opt():
    return adamw(pairs_of(RawNet()), lr=1e-2)


def _grads():
    return {k: torch.zeros_like(v) for k, v in _case_params().items()}


BAD_CALLS = [
    ("unknown pair names", lambda: adamw([("x.A", "x.B")]).init(_case_params()), ValueError,
     r"params has no entry for \['x.A', 'x.B'\]; it has 8 entries \('l1.lora_A', "),
    ("params not a dict", lambda: _opt().init([torch.zeros(2)]), TypeError, "params must be a dict of tensors"),
    ("integer params", lambda: _opt().init({**_case_params(), "n": torch.zeros(2, dtype=torch.long)}), TypeError,
     r"params\['n'\] has dtype torch.int64"),
    ("empty params", lambda: adamw(None).init({}), ValueError, "params is empty"),
    ("rank mismatch", lambda: _opt().init({**_case_params(), "l1.lora_B": torch.zeros(10, 2, dtype=torch.float64)}),
     ValueError, re.escape("pair 'l1': A has rank 3 (shape (3, 12)) but B has rank 2 (shape (10, 2))")),
    ("lr a vector", lambda: _opt().init(_case_params(), lr=torch.ones(2)), ValueError, "lr must be a float or a 0-d"),
    ("every pair above size", lambda: adamw([("a", "b")]).init({"a": torch.randn(4, 8), "b": torch.randn(2, 4)}),
     ValueError, "every pair has a rank above its layer's size"),
    ("grad missing", lambda: _opt().update({k: v for k, v in _grads().items() if k != "head.bias"},
                                           _opt().init(_case_params()), _case_params()),
     ValueError, r"grads lacks \['head.bias'\]"),
    ("grad shape", lambda: _opt().update({**_grads(), "head.bias": torch.zeros(5, dtype=torch.float64)},
                                         _opt().init(_case_params()), _case_params()),
     ValueError, r"grads\['head.bias'\] has shape \(5,\) but params\['head.bias'\] has \(4,\)"),
    ("state of SGD given to AdamW", lambda: _opt().update(_grads(), sgd(None).init(_case_params()), _case_params()),
     ValueError, "state has no 'exp_avg'"),
    ("state without a cached metric", lambda: adamw(pairs_of(RawNet()), interval=2, space="gradient").update(
        _grads(), {**adamw(pairs_of(RawNet()), interval=2, space="gradient").init(_case_params()), "metric": {}},
        _case_params()),
     ValueError, r"state\['metric'\] has no entry for \['l1', 'l2', 'l3'\]"),
    ("state not a dict", lambda: _opt().update(_grads(), None, _case_params()), TypeError, "state must be the dict"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_calls(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_import_reflora_exposes_func() -> None:
    assert reflora.func is importlib.import_module("reflora.func")
    assert "func" in reflora.__all__
    assert sorted(reflora.func.__all__) == reflora.func.__all__
    assert math.isclose(adamw(None).lr, 1e-3) and sgd(None).lr == 1e-3  # torch.optim's defaults
