"""RefLoRA under torch.compile: a compiled ``opt.step`` / train step, and ``attach(compile=True)``.

* The hooks inside a compiled step: no recompile after warm-up (across warmup / interval
  boundaries), no graph break in reflora's code (the only breaks are torch.optim's own
  ``torch._dynamo.graph_break()`` calls in ``_use_grad``), factors equal to eager.
* ``attach(compile=True)`` with an eager step: many distinct shapes and member sets that vary
  from step to step never crash, and do not recompile once every bucket has been seen.

Most tests compile with ``backend="aot_eager"`` or ``"eager"``: dynamo's guards, recompiles and
graph breaks do not depend on the backend, and inductor's code generation costs ~20 s per graph
on this CPU; one test runs inductor end to end.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import reflora
from attach_helpers import MODE_IDS, MODES, LoRANet

pytestmark = pytest.mark.compile
import reflora._kernels as attach_mod  # noqa: E402 (compile=True's kernel cache)

USER_BREAK = "Call to `torch._dynamo.graph_break()`"  # torch.optim's _use_grad: outside reflora


def _net_opt(variant, space, **kw):
    # SGD with momentum: its compiled step rounds exactly like its eager one, so any difference
    # would be reflora's (a compiled AdamW alone already differs from eager AdamW by ~1e-6
    # absolute here: Adam's normalisation amplifies round-off of near-zero gradients)
    net = LoRANet()
    opt = torch.optim.SGD(list(net.parameters()), lr=0.3, momentum=0.9)
    handle = reflora.attach(opt, net.pairs(), variant=variant, space=space, **kw)
    return net, opt, handle


def _eager_run(variant, space, steps, **kw):
    net, opt, handle = _net_opt(variant, space, **kw)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        opt.step()
    return net, handle


def _breaks_outside_reflora() -> None:
    reasons = list(counters["graph_break"])
    assert all(r.startswith(USER_BREAK) for r in reasons), reasons


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_compiled_optimizer_step(variant, space) -> None:
    """The compiled-optimizer recipe, crossing the warmup and interval boundaries after warm-up."""
    torch._dynamo.reset()
    counters.clear()
    kw = dict(warmup_steps=2, interval=2)
    net, opt, handle = _net_opt(variant, space, **kw)

    @torch.compile(fullgraph=False, backend="aot_eager")
    def step() -> None:
        opt.step()

    for t in range(8):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        if t == 2:  # parameter space compiles twice: before and after AdamW creates its state
            torch.compiler.set_stance("fail_on_recompile")
        try:
            step()
        finally:
            torch.compiler.set_stance("default")
    _breaks_outside_reflora()
    assert handle.step_count == 8
    ref, ref_handle = _eager_run(variant, space, 8, **kw)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the checkpoint is the eager one: step_count an int, the same cached metrics
    state, ref_state = handle.state_dict(), ref_handle.state_dict()
    assert state["step_count"] == 8 and isinstance(state["step_count"], int)
    assert sorted(state["cache"]) == sorted(ref_state["cache"])
    for k in state["cache"]:
        # S amplifies the factors' round-off (compiled AdamW rounds differently) by its condition number
        torch.testing.assert_close(state["cache"][k], ref_state["cache"][k], rtol=1e-3, atol=1e-5)


def test_diagnostics_of_compiled_steps_say_why_there_are_none() -> None:
    """Compiled steps record no diagnostics: asking for them says so and names the alternative."""
    torch._dynamo.reset()
    net, opt, handle = _net_opt("full", "parameter", diagnostics_interval=1)
    step = torch.compile(opt.step, backend="eager")
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        step()
    assert handle.step_count == 2
    with pytest.warns(UserWarning, match=r"none recorded.*torch\.compile.*diagnose\(handle\.pairs\)"):
        assert handle.diagnostics() is None
    stats = reflora.diagnostics.diagnose(list(handle.pairs))  # the alternative it names works
    assert set(stats) == {p.name for p in handle.pairs}


def test_whole_train_step_compiled_with_inductor() -> None:
    """Forward, backward and step in one compiled function (inductor), then eager steps resume."""
    torch._dynamo.reset()
    counters.clear()
    net, opt, handle = _net_opt("scalar", "gradient", warmup_steps=1, interval=2)

    @torch.compile
    def train_step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = net.loss()
        loss.backward()
        opt.step()
        return loss

    for t in range(5):
        if t == 2:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            train_step()
        finally:
            torch.compiler.set_stance("default")
    assert handle.step_count == 5
    for _ in range(2):  # eager steps after compiled ones pick up the counter and the cache
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        opt.step()
    assert handle.step_count == 7
    ref, _ = _eager_run("scalar", "gradient", 7, warmup_steps=1, interval=2)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _peft_mlp_adamw_run(mode: str | None, compiled: bool, steps: int = 6) -> list[list[torch.Tensor]]:
    """``B @ A`` after each step: a float32 PEFT MLP (r = 8, ``B = 0``), AdamW at lr 1e-2."""
    peft = pytest.importorskip("peft")
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2", "4"]))
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(128, 32, generator=g), torch.randn(128, 8, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    if mode is not None:
        variant, space = mode.split("/")
        reflora.attach(opt, model, variant=variant, space=space)
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (model(X) - Y).square().mean().backward()
        step()
        out.append([(m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone()
                    for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})])
    return out


def test_float32_compiled_steps_stay_within_a_few_times_bare_adamw() -> None:
    """Eager and compiled steps take one kernel path's answer: in float32 every mode's compiled-vs-
    eager difference of ``B @ A`` stays within a few times bare AdamW's own (torch's round-off of
    a compiled AdamW step). Release 0.2's full/gradient jumped to 100x at step 4 when the eager
    shortcut and the general kernel decided a live direction differently.
    (``benchmarks/compile_gap.py`` prints the table, with the dynamics' own sensitivity beside it.)"""

    def worst(mode):
        eager, comp = _peft_mlp_adamw_run(mode, False), _peft_mlp_adamw_run(mode, True)
        return max(((a - b).norm() / a.norm()).item() for s, t in zip(eager, comp) for a, b in zip(s, t))

    bare = worst(None)
    assert 1e-7 < bare < 1e-4  # the comparison below is against a real, small difference
    gaps = {mode: worst(mode) for mode in ("full/parameter", "full/gradient", "scalar/parameter", "scalar/gradient")}
    assert all(g <= 3 * bare for g in gaps.values()), (bare, gaps)


def test_compiled_step_honours_a_scaler_skip_without_a_host_sync() -> None:
    """``optimizer.found_inf`` (what GradScaler sets for fused optimizers) as a tensor gate."""

    class Plain(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            skip = getattr(self, "found_inf", None)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(torch.where(skip.bool(), 0.0, group["lr"] * p.grad))

    torch._dynamo.reset()
    net = LoRANet()
    opt = Plain(list(net.parameters()), lr=0.1)
    handle = reflora.attach(opt, net.pairs(), variant="full", space="gradient", interval=2)
    step = torch.compile(opt.step, backend="eager")
    for skip in (0.0, 0.0, 1.0, 0.0, 1.0, 0.0):
        opt.found_inf = torch.tensor(skip)
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        step()
    assert handle.step_count == 4


@pytest.fixture
def eager_backend(monkeypatch):
    """compile=True's kernels through dynamo with the eager backend (guards as with inductor)."""
    monkeypatch.setattr(attach_mod, "_BACKEND", "eager")
    torch._dynamo.reset()
    attach_mod._COMPILED.clear()
    attach_mod._COMPILED_SIZES.clear()
    yield
    attach_mod._COMPILED.clear()
    attach_mod._COMPILED_SIZES.clear()


def test_compile_true_with_many_shapes_and_varying_members(eager_backend) -> None:
    ranks = list(range(2, 12))  # 10 distinct ranks (all <= min(m, n)): 10 groups of 3 pairs
    g = torch.Generator().manual_seed(0)
    As = [nn.Parameter(torch.randn(r, 16, generator=g) / 4) for r in ranks for _ in range(3)]
    Bs = [nn.Parameter(torch.randn(12, r, generator=g) / 4) for r in ranks for _ in range(3)]
    x = torch.randn(8, 16, generator=g)

    def run(compile_, uses):
        ps = [nn.Parameter(p.detach().clone()) for p in As + Bs]
        A, B = ps[: len(As)], ps[len(As):]
        opt = torch.optim.Adam(ps, lr=1e-2)
        reflora.attach(opt, list(zip(A, B)), space="parameter", compile=compile_, warmup_steps=0)
        for t, used in enumerate(uses):
            if compile_ and t == len(uses) - 2:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                opt.zero_grad(set_to_none=True)
                sum(((x @ A[k].T) @ B[k].T).square().mean() for k in used).backward()
                opt.step()
            finally:
                torch.compiler.set_stance("default")
        return ps

    n = len(As)
    # member sets that vary (an MoE / a conditional branch): 3, 2, 1 pairs per group, then
    # repeats of sets already seen (buckets 4, 2, 1), which must not recompile
    uses = [range(n), [k for k in range(n) if k % 3], [k for k in range(n) if k % 3 == 0],
            [k for k in range(n) if k % 3 != 1], range(n)]
    got = run(True, uses)
    want = run(False, uses)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(attach_mod._COMPILED) == len(ranks)


def test_compile_true_falls_back_to_eager_beyond_the_bound(eager_backend, monkeypatch) -> None:
    monkeypatch.setattr(attach_mod, "_MAX_GRAPHS_PER_KEY", 2)
    X = torch.eye(3, dtype=torch.float64).expand(8, 3, 3).clone()
    for G in (1, 2):
        attach_mod.compiled_full_kernel(X[:G], X[:G], 1e-14, "paper")
    with pytest.warns(UserWarning, match="running that kernel eagerly"):
        out = attach_mod.compiled_full_kernel(X[:5], X[:5], 1e-14, "paper")
    assert out[0].shape == (5, 3, 3)

