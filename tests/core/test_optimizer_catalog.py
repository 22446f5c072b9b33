"""The optimizers of issue 33 (torch.optim.Muon, schedule-free, pytorch-optimizer's long tail): a
refactor keeps B A and moves every state key by its kind; the Shampoo family is refused clearly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import reflora
from reflora.transport import get_state_transport

schedulefree = pytest.importorskip("schedulefree")
po = pytest.importorskip("pytorch_optimizer")

M, N, R = 16, 12, 4

OPTIMIZERS = {
    "Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    "AdamWScheduleFree": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2, warmup_steps=2),
    "SGDScheduleFree": lambda ps: schedulefree.SGDScheduleFree(ps, lr=1e-2),
    "RAdamScheduleFree": lambda ps: schedulefree.RAdamScheduleFree(ps, lr=1e-2),
    "Lion": lambda ps: po.Lion(ps, lr=1e-3),
    "ADOPT": lambda ps: po.ADOPT(ps, lr=1e-2),
    "AdEMAMix": lambda ps: po.AdEMAMix(ps, lr=1e-2),
    "Prodigy": lambda ps: po.Prodigy(ps, lr=1.0),
    "AdaBelief": lambda ps: po.AdaBelief(ps, lr=1e-2),
    "Adan": lambda ps: po.Adan(ps, lr=1e-2),
    "Lamb": lambda ps: po.Lamb(ps, lr=1e-2),
    "ScheduleFreeAdamW": lambda ps: po.ScheduleFreeAdamW(ps, lr=1e-2),
}


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter(torch.randn(R, M, generator=g, dtype=torch.float64) * 2.0)
    B = nn.Parameter(torch.randn(N, R, generator=g, dtype=torch.float64) * 0.1)
    X = torch.randn(64, M, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(M, N, generator=g, dtype=torch.float64) / M**0.5
    return A, B, X, Y


def _loss(A, B, X, Y):
    return ((X @ A.T @ B.T - Y) ** 2).mean()


#: what each state key is, stated here from the optimizers' update rules (not read from the
#: registrations): covectors (linear in past gradients) and points of parameter space
COVECTORS = {
    "Muon": ["momentum_buffer"], "Lion": ["exp_avg"], "ADOPT": ["exp_avg"], "AdEMAMix": ["exp_avg", "exp_avg_slow"],
    "Prodigy": ["exp_avg", "s"], "AdaBelief": ["exp_avg"], "Adan": ["exp_avg", "exp_avg_diff", "previous_grad"],
    "Lamb": ["exp_avg"],
}
POINTS = {"AdamWScheduleFree": ["z"], "SGDScheduleFree": ["z"], "RAdamScheduleFree": ["z"], "Prodigy": ["p0"],
          "ScheduleFreeAdamW": ["z"]}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameter_space_refactor_moves_each_state_key_by_what_it_is(name) -> None:
    """A pre-hook registered before attach sees the factors, gradients and state before RefLoRA's
    refactor, one registered after it sees them after (before the optimizer's own update). A
    refactor ``A' = P^T A, B' = B P^{-T}`` keeps every pairing of a covector with a point
    (``<g, x>``: gradient or first moment with the factors or an iterate) and the product of
    every point (``B A``, ``z_B z_A``); mapping a point like a covector, or the reverse, breaks
    the pairings."""
    A, B, X, Y = _problem()
    opt = OPTIMIZERS[name]([A, B])
    transport = get_state_transport(opt)
    assert transport is not None and transport.refusal(opt) is None
    if hasattr(opt, "train"):
        opt.train()
    seen: dict[str, dict] = {}

    def snap(tag):
        def hook(o, args, kwargs):
            st_a, st_b = o.state.get(A, {}), o.state.get(B, {})
            covectors = {"grad": (A.grad, B.grad), **{k: (st_a[k], st_b[k]) for k in COVECTORS.get(name, []) if k in st_a}}
            points = {"param": (A, B), **{k: (st_a[k], st_b[k]) for k in POINTS.get(name, []) if k in st_a}}
            seen[tag] = {
                **{f"{c}.{p}": float((ca * pa).sum() + (cb * pb).sum())
                   for c, (ca, cb) in covectors.items() for p, (pa, pb) in points.items()},
                **{f"prod.{p}": (pb @ pa).detach().clone() for p, (pa, pb) in points.items()},
            }
            seen[tag + "-keys"] = set(covectors) | set(points)
        return hook

    opt.register_step_pre_hook(snap("before"))
    handle = reflora.attach(opt, [(A, B)], space="parameter", resolved=0.0)
    opt.register_step_pre_hook(snap("after"))
    losses = []
    for step in range(12):
        opt.zero_grad()
        loss = _loss(A, B, X, Y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        before, after = seen["before"], seen["after"]
        for key, value in before.items():
            if key.startswith("prod."):
                torch.testing.assert_close(after[key], value, rtol=1e-9, atol=1e-12, msg=f"{name}: {key}")
            else:
                assert after[key] == pytest.approx(value, rel=1e-8, abs=1e-10), (name, key, step)
    # every key named above was seen and checked (the optimizer keeps that state)
    assert seen["before-keys"] == {"grad", "param", *COVECTORS.get(name, []), *POINTS.get(name, [])}
    assert handle.step_count == 12 and all(torch.isfinite(torch.tensor(losses)))


def test_schedule_free_refactor_in_eval_mode_keeps_train_and_eval_points_consistent() -> None:
    """In eval() mode the parameters hold schedule-free's average x; a refactor there maps x and z
    by the same linear map, so after train() the interpolation y is the refactored y: its product
    is the product before, and train()/eval() still switch between consistent points."""
    A, B, X, Y = _problem(1)
    opt = schedulefree.AdamWScheduleFree([A, B], lr=1e-2, warmup_steps=2)
    opt.train()
    reflora.attach(opt, [(A, B)], resolved=0.0)
    for _ in range(5):
        opt.zero_grad()
        _loss(A, B, X, Y).backward()
        opt.step()
    y_prod = (B @ A).detach().clone()
    opt.eval()
    x_prod = (B @ A).detach().clone()
    opt.zero_grad()
    _loss(A, B, X, Y).backward()
    with pytest.raises(Exception, match="train mode"):  # schedule-free's own refusal, after RefLoRA's refactor
        opt.step()
    torch.testing.assert_close(B @ A, x_prod, rtol=1e-9, atol=1e-12)
    opt.train()
    torch.testing.assert_close(B @ A, y_prod, rtol=1e-9, atol=1e-12)
    opt.zero_grad()
    _loss(A, B, X, Y).backward()
    opt.step()  # training goes on
    assert torch.isfinite(A).all()


def test_shampoo_family_refuses_parameter_space_and_auto_picks_gradient_quietly() -> None:
    A, B, X, Y = _problem()
    with pytest.raises(reflora.UnsupportedOptimizerError, match="Kronecker factors.*space='gradient'"):
        reflora.attach(po.SOAP([A, B], lr=1e-3), [(A, B)], space="parameter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = reflora.attach(po.SOAP([A, B], lr=1e-3), [(A, B)])
    assert h.space == "gradient"


def test_unregistered_optimizer_error_gives_a_spec_from_its_state() -> None:
    A, B, X, Y = _problem()
    opt = po.LaProp([A, B], lr=1e-3)  # not registered: its exp_avg is a momentum of normalised steps
    opt.zero_grad()
    _loss(A, B, X, Y).backward()
    opt.step()
    with pytest.raises(reflora.UnsupportedOptimizerError) as err:
        reflora.attach(opt, [(A, B)], space="parameter")
    msg = str(err.value)
    assert "register_state_transport(LaProp, {'exp_avg': 'first', 'exp_avg_lr_1': '?'" in msg and len(msg) < 400


def test_auto_space_per_optimizer() -> None:
    """space='auto' as docs/optimizers.md's table gives it (measured, see there)."""
    want = {
        torch.optim.Muon: "gradient", schedulefree.AdamWScheduleFree: "parameter",
        schedulefree.SGDScheduleFree: "gradient", po.Lion: "gradient", po.ADOPT: "parameter",
        po.AdEMAMix: "parameter", po.Prodigy: "parameter", po.SOAP: "gradient",
    }
    assert {cls: reflora.default_space(cls) for cls in want} == want


@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_schedule_free_checkpoint_saved_in_either_mode_resumes_exactly(saved_in) -> None:
    """A checkpoint (factors, optimizer, handle) taken in train() or eval() mode resumes to the
    uninterrupted run: the handle's state does not depend on the mode, and schedule-free's
    param groups record which point the saved factors are."""

    def start():
        A, B, X, Y = _problem(2)
        opt = schedulefree.AdamWScheduleFree([A, B], lr=1e-2, warmup_steps=2)
        opt.train()
        return A, B, X, Y, opt, reflora.attach(opt, [(A, B)], resolved=0.0, warmup_steps=1)

    def steps(A, B, X, Y, opt, n):
        for _ in range(n):
            opt.zero_grad()
            _loss(A, B, X, Y).backward()
            opt.step()

    A, B, X, Y, opt, handle = start()
    steps(A, B, X, Y, opt, 5)
    if saved_in == "eval":
        opt.eval()
    saved = {"A": A.detach().clone(), "B": B.detach().clone(), "opt": copy.deepcopy(opt.state_dict()),
             "handle": copy.deepcopy(handle.state_dict())}
    opt.train()
    steps(A, B, X, Y, opt, 5)

    A2, B2, X, Y, opt2, handle2 = start()
    with torch.no_grad():
        A2.copy_(saved["A"])
        B2.copy_(saved["B"])
    opt2.load_state_dict(saved["opt"])
    handle2.load_state_dict(saved["handle"])
    opt2.train()
    steps(A2, B2, X, Y, opt2, 5)
    assert handle2.step_count == handle.step_count == 10
    torch.testing.assert_close(A2, A, rtol=0, atol=0)
    torch.testing.assert_close(B2, B, rtol=0, atol=0)
