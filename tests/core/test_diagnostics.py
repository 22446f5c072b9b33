"""reflora.diagnostics and RefLoRAHandle.diagnostics: the numbers, when they are taken, and from what."""

from __future__ import annotations

import math

import pytest
import torch

import reflora
from reflora.diagnostics import STATS, diagnose, pair_stats, summarize

from attach_helpers import LR, MODE_IDS, MODES, OPTIMIZERS, LoRANet, train


def _reference(A: torch.Tensor, B: torch.Tensor, variant: str) -> dict[str, float]:
    """The stats from their definitions, computed independently of the library's kernel."""
    A, B = A.double(), B.double()
    r = A.shape[0]
    sv = torch.linalg.svdvals(B @ A)
    if variant == "scalar":
        S = (B.norm() / A.norm()) * torch.eye(r, dtype=torch.float64)
    else:  # S X S = Y: S = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}
        w, V = torch.linalg.eigh(A @ A.T)
        Xh, Xmh = (V * w.sqrt()) @ V.T, (V / w.sqrt()) @ V.T
        w2, V2 = torch.linalg.eigh(Xh @ (B.T @ B) @ Xh)
        S = Xmh @ ((V2 * w2.sqrt()) @ V2.T) @ Xmh
    return {
        "imbalance": math.log(float(A.norm() / B.norm())),
        "cond_AAt": float(torch.linalg.cond(A @ A.T)),
        "cond_BtB": float(torch.linalg.cond(B.T @ B)),
        "S_deviation": float((S - torch.eye(r, dtype=torch.float64)).norm() / math.sqrt(r)),
        "sigma_max": float(sv[0]),
        "sigma_min": float(sv[r - 1]) if r <= min(A.shape[1], B.shape[0]) else 0.0,
    }


@pytest.mark.parametrize("variant", ["full", "scalar"])
def test_stats_match_their_definitions(variant) -> None:
    g = torch.Generator().manual_seed(0)
    pairs = [(3 * torch.randn(4, 20, generator=g), 0.1 * torch.randn(16, 4, generator=g)) for _ in range(3)]
    pairs.append((torch.randn(4, 12, generator=g), torch.randn(30, 4, generator=g)))  # another shape
    rows = diagnose(pairs, variant=variant)
    assert list(rows) == [f"pair{i}" for i in range(4)]
    for (A, B), row in zip(pairs, rows.values()):
        want = _reference(A, B, variant)
        assert set(row) == set(STATS)
        for k in STATS:
            assert row[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


def test_degenerate_pairs_give_inf_not_errors() -> None:
    A, B = torch.randn(4, 20), torch.zeros(16, 4)  # PEFT's init
    row = diagnose([(A, B)])["pair0"]
    assert row["imbalance"] == math.inf and row["cond_BtB"] == math.inf
    assert row["S_deviation"] == 0.0 and row["sigma_max"] == 0.0  # no product: plain LoRA's metric
    row = diagnose([(torch.randn(8, 4), torch.randn(6, 8))])["pair0"]  # r = 8 > min(m, n) = 4
    assert row["cond_AAt"] == math.inf and row["sigma_min"] == 0.0


def test_pair_stats_is_batched_over_leading_dims() -> None:
    A, B = torch.randn(2, 3, 4, 10, dtype=torch.float64), torch.randn(2, 3, 9, 4, dtype=torch.float64)
    st = pair_stats(A @ A.mT, B.mT @ B)
    assert all(v.shape == (2, 3) for v in st.values())
    one = pair_stats(A[1, 2] @ A[1, 2].mT, B[1, 2].mT @ B[1, 2])
    for k in STATS:
        assert torch.allclose(st[k][1, 2], one[k])


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_handle_records_every_k_steps_before_reflora_acts(variant, space) -> None:
    net = LoRANet()
    opt = OPTIMIZERS["AdamW"](list(net.parameters()), LR["AdamW"])
    snaps = {}
    # a pre-hook registered before attach runs before RefLoRA's: the factors as the step begins
    opt.register_step_pre_hook(lambda o, a, k: snaps.__setitem__(len(snaps), [(x.detach().clone(), y.detach().clone()) for x, y in net.pairs()]))
    handle = reflora.attach(opt, net.pairs(), variant=variant, space=space, diagnostics_interval=3, warmup_steps=1)
    assert handle.diagnostics() is None
    train(net, opt, 8)
    diag = handle.diagnostics()
    assert diag["step"] == 6
    want = diagnose(snaps[6], variant=variant)
    for (name, row), ref in zip(diag["pairs"].items(), want.values()):
        for k in STATS:
            assert row[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), (name, k)
    s = summarize(diag["pairs"])
    assert s["reflora/imbalance_abs_max"] == max(abs(r["imbalance"]) for r in diag["pairs"].values())


def test_parameter_space_balances_what_gradient_space_leaves_imbalanced() -> None:
    """What the stats are for: AdamW leaves LoRA's factors imbalanced; parameter space keeps
    them balanced up to one optimizer step."""
    runs = {}
    for space in ("gradient", "parameter"):
        net = LoRANet()
        opt = OPTIMIZERS["AdamW"](list(net.parameters()), LR["AdamW"])
        handle = reflora.attach(opt, net.pairs(), space=space, diagnostics_interval=10)
        train(net, opt, 41)
        runs[space] = summarize(handle.diagnostics()["pairs"])
    assert runs["parameter"]["reflora/imbalance_abs_max"] < 0.1 < runs["gradient"]["reflora/imbalance_abs_max"]
    assert runs["parameter"]["reflora/S_deviation_max"] < runs["gradient"]["reflora/S_deviation_max"]


def test_bad_interval() -> None:
    net = LoRANet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="diagnostics_interval must be >= 0"):
        reflora.attach(opt, net.pairs(), diagnostics_interval=-1)
