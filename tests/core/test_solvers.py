"""The eigh-free solver (solver="newton_schulz") against the eigh kernel, and its contract:
S X S = Y, S S^-1 = I, B = 0 -> I exactly, r > min(m, n) finite with the product kept, batched ==
vmap == loop, compiled == eager without recompiling, attach in every mode, clear errors."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reflora
from reflora._linalg import NS_SHIFT, newton_schulz_metric
from reflora.functional import RankAboveSizeWarning, precondition, preconditioner, refactor, refactor_transform
from strategies import PairSpec, build, pair_specs

from conftest import DEVICES

NS = "newton_schulz"
MODES = [("full", "gradient"), ("full", "parameter"), ("scalar", "gradient"), ("scalar", "parameter")]


def f64(*ts):
    return [t.detach().to(device="cpu", dtype=torch.float64) for t in ts]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst relative Frobenius error over the batch."""
    x, ref = f64(x, ref)
    return float(((x - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)).max())


# --------------------------------------------------------------------------- against eigh


@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs(full_rank=True, max_r=32, max_dim=96, max_cond=1e3))
def test_newton_schulz_matches_eigh(spec: PairSpec, dev: str) -> None:
    """S, S^-1, the preconditioned gradients and the symmetric-frame factors agree with eigh.

    Tolerance, a function of conditioning: the shift (1e-12 of the mean eigenvalue) moves S by
    about 1e-12 (cond(A)^2 + cond(B)^2) (measured <= 6e-13 of it; 10x margin here), plus the
    round-off both kernels share (float64 Grams) and the rounding of outputs to the storage dtype.
    """
    A, B = build(spec, dev)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    ka = spec.cond_a**2 + spec.cond_b**2
    kab = spec.cond_a * spec.cond_b
    tol64 = 10 * NS_SHIFT * ka + 1e-13 * kab
    tol = tol64 + 16 * torch.finfo(spec.dtype).eps * kab
    S_e, Si_e = preconditioner(A, B)
    S_n, Si_n = preconditioner(A, B, solver=NS)
    assert S_n.dtype == torch.float64 and S_n.device == A.device
    assert rel(S_n, S_e) <= tol64, rel(S_n, S_e) / tol64
    assert rel(Si_n, Si_e) <= tol64, rel(Si_n, Si_e) / tol64
    for x, y in zip(precondition(A, B, gA, gB, solver=NS), precondition(A, B, gA, gB)):
        assert x.dtype == spec.dtype
        assert rel(x, y) <= tol, rel(x, y) / tol
    for x, y in zip(refactor(A, B, solver=NS), refactor(A, B, frame="symmetric")):
        assert rel(x, y) <= tol, rel(x, y) / tol


@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs(dtypes=(torch.float64,), full_rank=True, max_cond=100.0, max_r=32, max_dim=96))
def test_newton_schulz_solves_riccati_and_inverts(spec: PairSpec, dev: str) -> None:
    A, B = build(spec, dev)
    left, right, S, S_inv = f64(*newton_schulz_metric(*(lambda a, b: (a @ a.mT, b.mT @ b))(A, B), 1.4e-14))
    A, B = f64(A, B)
    X, Y = A @ A.mT, B.mT @ B
    eye = torch.eye(spec.r, dtype=torch.float64)
    k = spec.cond_a**2 + spec.cond_b**2
    assert torch.equal(S, S.mT) and torch.equal(left, left.mT)  # symmetrised every step
    assert (torch.linalg.eigvalsh(S) > 0).all()
    assert rel(S @ X @ S, Y) <= 1e-11 * k
    assert float((S @ S_inv - eye).abs().max()) <= 1e-10
    assert float((left @ right - eye).abs().max()) <= 1e-10  # P^T P^-T = I: the product is kept
    assert rel(left @ left, S) <= 1e-10


# --------------------------------------------------------------------------- dead directions


@pytest.mark.parametrize("dev", DEVICES)
def test_zero_product_gives_identity_exactly(dev) -> None:
    A = torch.randn(3, 4, 32, device=dev)
    B = torch.zeros(3, 16, 4, device=dev)
    B[1] = torch.randn(16, 4, device=dev)  # a live pair in the same batch
    S, S_inv = preconditioner(A, B, solver=NS)
    eye = torch.eye(4, dtype=S.dtype, device=dev)
    for i in (0, 2):
        assert torch.equal(S[i], eye) and torch.equal(S_inv[i], eye)
        A2, B2 = refactor(A[i], B[i], solver=NS)
        assert torch.equal(A2, A[i]) and torch.equal(B2, B[i])
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    pA, pB = precondition(A, B, gA, gB, solver=NS)
    assert torch.equal(pA[0], gA[0]) and torch.equal(pB[2], gB[2])
    assert not torch.equal(S[1], eye)
    A2, B2 = refactor(torch.zeros_like(A), torch.randn_like(B), solver=NS)  # A = 0 too
    assert not A2.any() and torch.isfinite(B2).all()


@pytest.mark.parametrize("r,m,n", [(16, 8, 4), (8, 32, 3), (8, 4, 32), (6, 6, 6)])
def test_rank_deficient_is_finite_and_keeps_the_product(r, m, n) -> None:
    """r > min(m, n) (and a square pair of product rank 3): finite, product kept; unlike eigh
    the metric is not the identity on the dead directions (cond(S) up to ~1e7, documented)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, r, m, generator=g, dtype=torch.float64)
    B = torch.randn(2, n, r, generator=g, dtype=torch.float64)
    if r == m == n:
        B[..., 3:] = 0.0
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankAboveSizeWarning)
        S, S_inv = preconditioner(A, B, solver=NS)
        A2, B2, gA2, gB2 = refactor(A, B, (gA, gB), solver=NS)
        pA, pB = precondition(A, B, gA, gB, solver=NS)
        for t in (S, S_inv, A2, B2, gA2, gB2, pA, pB):
            assert torch.isfinite(t).all()
        assert torch.allclose(B2 @ A2, B @ A, atol=1e-10)
        assert float(torch.linalg.cond(S).max()) < 1e8
        # the float32 kernel path of the same pair agrees
        A3, B3 = refactor(A.float(), B.float(), solver=NS)
    assert torch.allclose((B3 @ A3).double(), B @ A, atol=1e-4)


def test_dead_in_both_factors_gets_the_scalar_balance() -> None:
    """A direction dead in both factors: NS gives RefLoRA-S's sqrt(tr Y / tr X), eigh gives 1."""
    g = torch.Generator().manual_seed(4)
    A = torch.zeros(3, 20, dtype=torch.float64)
    B = torch.zeros(10, 3, dtype=torch.float64)
    A[:2] = 5 * torch.randn(2, 20, generator=g, dtype=torch.float64)
    B[:, :2] = 0.1 * torch.randn(10, 2, generator=g, dtype=torch.float64)
    S_e, _ = preconditioner(A, B)
    S_n, _ = preconditioner(A, B, solver=NS)
    assert torch.allclose(S_e[2, 2], torch.tensor(1.0, dtype=torch.float64))
    p2 = B.norm() / A.norm()
    assert torch.allclose(S_n[2, 2], p2, rtol=1e-8)
    assert torch.allclose(S_n[:2, :2], S_e[:2, :2], rtol=1e-9)  # the live block is the same


# --------------------------------------------------------------------------- batching, vmap, compile


@given(spec=pair_specs(max_r=16, max_dim=48, max_cond=100.0))
def test_batched_equals_loop_and_vmap(spec: PairSpec) -> None:
    A, B = build(spec)
    A = A.reshape(-1, spec.r, spec.m)
    B = B.reshape(-1, spec.n, spec.r)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankAboveSizeWarning)
        batched = refactor(A, B, (gA, gB), solver=NS)
        vmapped = torch.func.vmap(lambda a, b, x, y: refactor(a, b, (x, y), solver=NS))(A, B, gA, gB)
        pre = precondition(A, B, gA, gB, solver=NS)
        pre_v = torch.func.vmap(lambda a, b, x, y: precondition(a, b, x, y, solver=NS))(A, B, gA, gB)
        looped = [refactor(A[i], B[i], (gA[i], gB[i]), solver=NS) for i in range(A.shape[0])]
        pre_l = [precondition(A[i], B[i], gA[i], gB[i], solver=NS) for i in range(A.shape[0])]
    r = max(1e3 * torch.finfo(spec.dtype).eps, 1e-9)
    if spec.r > min(spec.m, spec.n):
        # Dead directions: the metric there is set by the 1e-12 shift against the Grams' round-off
        # (1e-16 of their trace), so batched and per-pair matmuls differ there by up to ~1e-4; and
        # the random gradients here have components along null(B) that S^-1 scales by up to 1e6
        # (a real grad_A = B^T G has none). Compare relative to each output's magnitude.
        r = max(r, 1e-3)

    def close(x, y):
        return torch.allclose(x, y, rtol=r, atol=r * float(y.abs().max() + 1))

    for k in range(4):
        assert close(vmapped[k], batched[k])
        for i, lp in enumerate(looped):
            assert close(lp[k], batched[k][i])
    for k in range(2):
        assert close(pre_v[k], pre[k])
        for i, lp in enumerate(pre_l):
            assert close(lp[k], pre[k][i])


@pytest.mark.compile
def test_compiled_matches_eager_without_recompiling(device) -> None:
    torch._dynamo.reset()

    # refactor runs both iterations (S, then S^{1/2}); precondition's graph is a part of it.
    # The steps are unrolled: inductor takes ~25 s on a 2-core CPU for this graph.
    def step(A, B, gA, gB):
        return refactor(A, B, (gA, gB), solver=NS)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        A = (5 * torch.randn(3, 8, 48, generator=g)).to(device)
        B = (0.1 * torch.randn(3, 40, 8, generator=g)).to(device)
        B[1] = 0.0
        return A, B, torch.randn(A.shape, generator=g).to(device), torch.randn(B.shape, generator=g).to(device)

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1):
        args = inputs(seed)
        ctx = torch.compiler.set_stance("fail_on_recompile") if seed else contextlib.nullcontext()
        with ctx:
            got = compiled(*args)
        for e, c in zip(step(*args), got):
            assert torch.allclose(c, e, rtol=1e-5, atol=1e-5 * float(e.abs().max().clamp_min(1.0)))


# --------------------------------------------------------------------------- attach


def _train(mode, solver, steps=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, m, n = 4, 40, 24
    X = torch.randn(64, m, generator=g)
    Y = X @ (torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)).T / r
    A = torch.nn.Parameter(torch.randn(r, m, generator=g) / m**0.5)
    B = torch.nn.Parameter(torch.zeros(n, r))
    opt = torch.optim.AdamW([A, B], lr=1e-2)
    handle = reflora.attach(opt, [(A, B)], variant=mode[0], space=mode[1], solver=solver)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ (B @ A).T - Y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
    return handle, losses, A, B


@pytest.mark.parametrize("mode", MODES, ids=[f"{v}-{s}" for v, s in MODES])
def test_attach_trains_in_every_mode(mode) -> None:
    handle, losses, _, _ = _train(mode, NS)
    assert handle.solver == NS and handle.frame == "symmetric"
    assert f"solver='{NS}'" in repr(handle)
    assert losses[-1] < 0.2 * losses[0]
    if mode[0] == "scalar":  # the scalar variant has nothing to decompose: identical runs
        assert losses == _train(mode, "eigh")[1]


def test_attach_parameter_refactor_keeps_the_product() -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.nn.Parameter(3 * torch.randn(2, 6, 30, generator=g)[0])
    B = torch.nn.Parameter(0.1 * torch.randn(20, 6, generator=g))
    opt = torch.optim.SGD([A, B], lr=0.0)  # a zero step: only the refactor changes the factors
    reflora.attach(opt, [(A, B)], space="parameter", solver=NS)
    W = (B @ A).detach().clone()
    (B @ A).sum().backward()
    opt.step()
    assert not torch.allclose(A.detach(), 3 * torch.randn(2, 6, 30, generator=torch.Generator().manual_seed(3))[0])
    assert torch.allclose(B @ A, W, rtol=1e-5, atol=1e-5 * float(W.abs().max()))
    G1, G2 = A @ A.T, B.T @ B  # and balanced
    assert torch.allclose(G1, G2, rtol=1e-4, atol=1e-4 * float(G1.detach().abs().max()))


# --------------------------------------------------------------------------- errors


def test_bad_solver_and_paper_frame_raise_with_the_fix() -> None:
    A, B = torch.randn(4, 10), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"solver must be one of \('eigh', 'newton_schulz'\); got 'svd'"):
        refactor(A, B, solver="svd")
    with pytest.raises(ValueError, match=r"solver must be one of"):
        precondition(A, B, A, B, solver="ns")
    with pytest.raises(ValueError, match=r"solver must be one of"):
        preconditioner(A, B, solver=None)
    fix = r"frame='paper'.*solver='newton_schulz'.*frame='symmetric'.*solver='eigh'"
    with pytest.raises(ValueError, match=fix):
        refactor(A, B, frame="paper", solver=NS)
    with pytest.raises(ValueError, match=fix):
        refactor_transform(A, B, frame="paper", solver=NS)
    pA, pB = torch.nn.Parameter(A), torch.nn.Parameter(B)
    opt = torch.optim.SGD([pA, pB], lr=0.1)
    with pytest.raises(ValueError, match=fix):
        reflora.attach(opt, [(pA, pB)], space="parameter", frame="paper", solver=NS)
    with pytest.raises(ValueError, match=r"solver must be one of"):
        reflora.attach(opt, [(pA, pB)], solver="eig")
    # the frame default follows the solver
    assert reflora.attach(opt, [(pA, pB)]).frame == "paper"


@given(solver=st.sampled_from(["eigh", NS]))
def test_frame_default_follows_the_solver(solver) -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64)
    B = torch.randn(12, 4, generator=g, dtype=torch.float64)
    frame = "paper" if solver == "eigh" else "symmetric"
    assert torch.equal(refactor(A, B, solver=solver)[0], refactor(A, B, solver=solver, frame=frame)[0])
