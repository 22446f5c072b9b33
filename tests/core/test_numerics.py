"""Numerics contract: float32/bf16 accuracy, dead directions (B = 0, r > min(m, n)), the frames,
reproducible factors (eager == compiled), and the rank-above-size handling of attach."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reflora
from reflora._linalg import _live_basis, _separated
from reflora.functional import RankAboveSizeWarning, preconditioner, refactor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "studies"))
import rank_above_size  # noqa: E402  (benchmarks/studies/rank_above_size.py prints a table in docs/theory.md)
from numerics import errors  # noqa: E402  (benchmarks/numerics.py prints a table in docs/theory.md)

from conftest import DEVICES  # noqa: E402

MODES = [("full", "gradient"), ("full", "parameter"), ("scalar", "gradient"), ("scalar", "parameter")]


# --------------------------------------------------------------------------- accuracy


@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    log_cond=st.floats(0.0, 3.0),
    r=st.integers(1, 32),
    seed=st.integers(0, 2**16),
)
def test_low_precision_factors_within_one_percent_of_float64(dtype, log_cond, r, seed) -> None:
    """cond(A), cond(B) up to 1e3: S, the preconditioned gradients and the balance within 1% of
    the answer for the same stored values in float64 (docs/theory.md: "Numerics and limits (measured)")."""
    err = errors(r, 10.0**log_cond, dtype, seed, m=96, n=80)
    assert max(err.values()) < 1e-2, err


# --------------------------------------------------------------------------- dead directions


@pytest.mark.parametrize("dev", DEVICES)
def test_zero_product_gives_identity_exactly(dev) -> None:
    A = torch.randn(2, 4, 32, device=dev)
    B = torch.zeros(2, 16, 4, device=dev)
    for frame in ("symmetric", "paper"):
        A2, B2 = refactor(A, B, frame=frame)
        assert torch.equal(A2, A) and torch.equal(B2, B)
    S, S_inv = preconditioner(A, B)
    eye = torch.eye(4, dtype=S.dtype, device=dev)
    assert torch.equal(S, eye.expand_as(S)) and torch.equal(S_inv, eye.expand_as(S_inv))


@pytest.mark.parametrize("r,m,n", [(16, 8, 4), (8, 32, 3), (8, 4, 32), (6, 6, 6)])
def test_rank_deficient_product_is_bounded(r, m, n) -> None:
    """Dead directions get the identity metric: S stays as well conditioned as the live part
    needs (no eigenvalue floor blowing up P), and the product is kept."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, m, generator=g, dtype=torch.float64)
    B = torch.randn(n, r, generator=g, dtype=torch.float64)
    if r == m == n:  # a square pair whose product has rank 3
        B[:, 3:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankAboveSizeWarning)
        S, S_inv = preconditioner(A, B)
        A2, B2 = refactor(A, B)
    assert torch.allclose(S @ S_inv, torch.eye(r, dtype=torch.float64), atol=1e-9)
    assert torch.linalg.cond(S) < 1e3
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-10)


def test_full_rank_part_is_balanced_when_some_directions_are_dead() -> None:
    """A product of rank k < r: the k live directions are balanced like the paper's S."""
    g = torch.Generator().manual_seed(1)
    r, m, n, k = 6, 20, 18, 3
    A = torch.randn(r, m, generator=g, dtype=torch.float64)
    B = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, r, generator=g, dtype=torch.float64)
    sv = torch.linalg.svdvals(B @ A)[:k]
    for frame in ("symmetric", "paper"):
        A2, B2 = refactor(A, B, frame=frame)
        assert torch.allclose(B2 @ A2, B @ A, atol=1e-9)
        G1, G2 = A2 @ A2.mT, B2.mT @ B2
        ev, V = torch.linalg.eigh(G2)
        assert torch.allclose(ev.flip(0)[:k], sv, rtol=1e-8)  # B' carries sigma on the live block
        assert ev[: r - k].abs().max() < 1e-8 * float(sv[0])  # and nothing on the dead ones
        Vk = V[:, r - k:]  # the live block: A' compressed onto it is balanced with B'
        assert torch.allclose(Vk.mT @ G1 @ Vk, Vk.mT @ G2 @ Vk, atol=1e-8 * float(sv[0]))


def test_frames_share_the_metric_and_paper_frame_is_diagonal() -> None:
    g = torch.Generator().manual_seed(2)
    A = 3 * torch.randn(5, 40, generator=g, dtype=torch.float64)
    B = 0.1 * torch.randn(30, 5, generator=g, dtype=torch.float64)
    T_sym = reflora.refactor_transform(A, B, frame="symmetric")
    T_pap = reflora.refactor_transform(A, B, frame="paper")
    assert torch.allclose(T_sym.left.mT @ T_sym.left, T_pap.left.mT @ T_pap.left, atol=1e-10)
    assert torch.allclose(T_sym.left, T_sym.left.mT, atol=1e-12)  # S^{1/2}
    A2, B2 = refactor(A, B, frame="paper")
    G = A2 @ A2.mT
    sv = torch.linalg.svdvals(B @ A)[:5]
    # well separated singular values: the exact eigenbasis, diagonal to round-off, descending
    assert torch.allclose(G, torch.diag(sv), atol=1e-12 * float(sv[0]))
    assert torch.allclose(B2.mT @ B2, torch.diag(sv), atol=1e-12 * float(sv[0]))
    # sign convention: the largest entry of every column of right = P^{-T} is positive
    idx = T_pap.right.abs().argmax(0)
    assert (T_pap.right[idx, torch.arange(5)] > 0).all()


def test_paper_frame_tie_breaker_only_where_the_basis_is_ill_determined() -> None:
    """Singular values closer than ~1e-4 of their mean get the coordinate-ordering tie-breaker
    (the balanced Grams are then diagonal to about delta / gap only); the rest the exact basis."""
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    for sv, exact in (([4.0, 3.0, 2.0, 1.0], True), ([4.0, 3.0, 2.0 + 1e-9, 2.0], False)):
        s = torch.tensor(sv, dtype=torch.float64)
        A = (Q * s.sqrt()).mT @ W.mT * 2.0  # an imbalanced factorization of U diag(s) W^T
        B = U @ (Q * s.sqrt()) / 2.0
        X, Y = A @ A.mT, B.mT @ B
        lam_a, sig2, _, live = _live_basis(X, Y, 1.4e-14)
        assert bool(_separated(lam_a, sig2, live)) is exact
        A2, B2 = refactor(A, B, frame="paper")
        assert torch.allclose(B2 @ A2, B @ A, atol=1e-12)
        # exact basis: diagonal to round-off; tie-broken: within the 1e-9 gap of the block
        off = (A2 @ A2.mT - torch.diag(s)).abs().max()
        assert off < (1e-12 if exact else 1e-8)
        # both are reproducible: batched with other pairs, the same factors
        A3, B3 = refactor(torch.stack([A, 3 * A]), torch.stack([B, B / 3]), frame="paper")
        assert torch.allclose(A3[0], A2, atol=1e-8) and torch.allclose(B3[0], B2, atol=1e-8)


@pytest.mark.parametrize("frame", ["paper", "symmetric"])
def test_refactoring_a_refactored_pair_changes_nothing(frame) -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 30, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    A, B = refactor(A, B, frame=frame)
    A3, B3 = refactor(A, B, frame=frame)
    # the symmetric frame is the identity on a balanced pair; the paper frame's tie-breaker
    # (1e-7 of the mean singular value) turns its basis by about delta / gap
    tol = 1e-10 if frame == "symmetric" else 1e-6 * float(A.abs().max())
    assert torch.allclose(A3, A, atol=tol) and torch.allclose(B3, B, atol=tol)


# --------------------------------------------------------------------------- shapes and swaps


def test_rank_above_size_warns_with_the_fix() -> None:
    A, B = torch.randn(4, 48), torch.randn(48, 4)  # a square layer: (B, A) fits as (A, B) with r = 48
    with pytest.warns(RankAboveSizeWarning, match=r"r=48 exceeds min\(m, n\)=4\. Did you pass \(B, A\)\?"):
        refactor(B, A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refactor(A, B)  # r = 4 <= min(48, 48): silent


# --------------------------------------------------------------------------- reproducible factors


@pytest.mark.compile
@pytest.mark.parametrize("frame", ["paper", "symmetric"])
def test_parameter_space_factors_equal_eager_and_compiled(frame) -> None:
    """Canonical factors: attach(compile=True) and eager give the same factors (release 0.1: 0.77 apart)."""
    torch._dynamo.reset()

    def run(compile_: bool):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(3 * torch.randn(4, 24, generator=g)), torch.nn.Parameter(0.1 * torch.randn(16, 4, generator=g)),
              torch.nn.Parameter(torch.randn(4, 24, generator=g)), torch.nn.Parameter(torch.randn(16, 4, generator=g))]
        opt = torch.optim.AdamW(ps, lr=1e-2)
        reflora.attach(opt, [(ps[0], ps[1]), (ps[2], ps[3])], space="parameter", compile=compile_, frame=frame)
        x = torch.randn(8, 24, generator=g)
        for _ in range(3):
            opt.zero_grad()
            loss = sum((x @ a.T @ b.T).square().mean() for a, b in ((ps[0], ps[1]), (ps[2], ps[3])))
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in ps]

    for e, c in zip(run(False), run(True)):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6), (e - c).abs().max()


# --------------------------------------------------------------------------- attach: r > min(m, n)


def _train(mode, opt_name, r, m, n, seed, **kw):
    first, last = rank_above_size.run(mode, {"adamw": "AdamW", "sgd": "SGD"}[opt_name], r, m, n, seed, **kw)
    assert math.isfinite(last)
    return first, last


@pytest.mark.parametrize("mode", MODES, ids=[f"{v}-{s}" for v, s in MODES])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("shape", [(16, 8, 4), (8, 32, 3)])
@pytest.mark.parametrize("solver", ["eigh", "newton_schulz"])
def test_rank_above_size_act_stays_finite_and_trains(mode, opt_name, shape, solver) -> None:
    """Before: NaN under AdamW and SGD-momentum in full/parameter (the floor made P ill-conditioned)."""
    if mode[0] == "scalar" and solver != "eigh":
        pytest.skip("the scalar variant ignores the solver")
    if solver == "newton_schulz" and mode == ("full", "parameter"):
        # no dead-direction handling: P is ill-conditioned there and training went to NaN
        with pytest.raises(ValueError, match=r"solver='newton_schulz' with space='parameter' cannot refactor"):
            _train(mode, opt_name, *shape, seed=0, rank_above_size="act", solver=solver)
        return
    first, last = _train(mode, opt_name, *shape, seed=0, rank_above_size="act", solver=solver)
    assert last < 0.5 * first


def test_rank_above_size_is_skipped_by_default_with_a_warning() -> None:
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.nn.Parameter(torch.randn(8, 32, generator=g)), torch.nn.Parameter(torch.randn(3, 8, generator=g))
    A2, B2 = torch.nn.Parameter(torch.randn(4, 32, generator=g)), torch.nn.Parameter(torch.randn(16, 4, generator=g))
    opt = torch.optim.SGD([A1, B1, A2, B2], lr=0.1)
    with pytest.warns(UserWarning, match=r"leaving 1 pair\(s\) .*'head' \(r=8, m=32, n=3\).*rank_above_size='act'"):
        handle = reflora.attach(opt, [reflora.LoRAPair("head", A1, B1), reflora.LoRAPair("body", A2, B2)])
    assert [p.name for p in handle.pairs] == ["body"]
    with pytest.raises(ValueError, match=r"every pair has a rank above its layer's size.*rank_above_size='act'"):
        reflora.attach(torch.optim.SGD([A1, B1], lr=0.1), [(A1, B1)])
    with pytest.raises(ValueError, match=r"rank_above_size must be 'skip' or 'act'; got 'drop'"):
        reflora.attach(torch.optim.SGD([A2, B2], lr=0.1), [(A2, B2)], rank_above_size="drop")
    with pytest.raises(ValueError, match=r"frame must be one of \('paper', 'symmetric', 'block'\); got 'eigen'"):
        reflora.attach(torch.optim.SGD([A2, B2], lr=0.1), [(A2, B2)], frame="eigen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
@pytest.mark.parametrize("frame", ["paper", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_equal_across_devices(frame, dtype) -> None:
    """Canonical factors: CUDA gives what the CPU gives, to round-off (batched, with a B = 0 pair)."""
    g = torch.Generator().manual_seed(5)
    A = (3 * torch.randn(6, 8, 64, generator=g)).to(dtype)
    B = (0.1 * torch.randn(6, 48, 8, generator=g)).to(dtype)
    B[2] = 0.0
    cpu = refactor(A, B, frame=frame)
    gpu = refactor(A.cuda(), B.cuda(), frame=frame)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    for c, d in zip(cpu, gpu):
        assert torch.allclose(d.cpu(), c, rtol=tol, atol=tol * float(c.abs().max())), (d.cpu() - c).abs().max()


@pytest.mark.parametrize("frame", [None, "paper"])
def test_eager_shortcut_equals_the_general_kernel(frame) -> None:
    """attach's eager CPU shortcut (two eigh for all-live pairs, the general kernel for the rest)
    gives the general kernel's answer, pair by pair, in a stack mixing every kind of pair."""
    from reflora._kernels import eager_kernel, full_kernel, grams

    g = torch.Generator().manual_seed(7)
    r, m, n = 4, 24, 20
    A = torch.randn(7, r, m, generator=g, dtype=torch.float64) * torch.rand(7, r, 1, generator=g, dtype=torch.float64)
    B = 0.1 * torch.randn(7, n, r, generator=g, dtype=torch.float64)
    B[1] = 0.0  # no live direction (PEFT's init)
    B[2, :, 0] = 0.0  # one dead direction
    B[3] = B[3] @ torch.diag(torch.tensor([1.0, 1.0, 1.0 + 1e-12, 2.0], dtype=torch.float64))  # near ties
    A[4, 0, 0] = float("nan")  # a non-finite pair in its own stack below
    X, Y = grams(A, B)
    ref = full_kernel(X, Y, 1.4e-14, frame or "paper")
    ref = ref[2:] if frame is None else ref
    general = lambda x, y: (lambda o: o[2:] if frame is None else o)(full_kernel(x, y, 1.4e-14, frame or "paper"))  # noqa: E731
    keep = torch.tensor([0, 1, 2, 3, 5, 6])
    out = eager_kernel(X[keep], Y[keep], 1.4e-14, frame, general)
    for o, want in zip(out, ref):
        assert torch.allclose(o, want[keep], rtol=1e-9, atol=1e-9 * float(want[keep].abs().max()))
    # experts: (G, E, r, r) stacks take the same path
    out = eager_kernel(X[keep].view(2, 3, r, r), Y[keep].view(2, 3, r, r), 1.4e-14, frame, general)
    for o, want in zip(out, ref):
        assert torch.allclose(o.reshape(-1, r, r), want[keep], rtol=1e-9, atol=1e-9 * float(want[keep].abs().max()))
    # a non-finite Gram anywhere: the whole stack goes to the general kernel (NaN for that pair)
    out = eager_kernel(X, Y, 1.4e-14, frame, general)
    assert torch.isnan(out[0][4]).all() and torch.allclose(out[0][0], ref[0][0], rtol=1e-9)
