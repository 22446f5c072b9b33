"""Property tests for the RefLoRA math in reflora.functional (arXiv 2505.18877)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reflora.functional import (
    Refactored,
    apply_transform,
    RefactoredWithGrads,
    map_first_moments,
    map_second_moments,
    precondition,
    preconditioner,
    refactor,
    refactor_transform,
)
from strategies import PairSpec, build, pair_specs

from conftest import DEVICES

VARIANTS = ["full", "scalar"]
SOLVERS = ["eigh", "newton_schulz"]


def f64(*ts):
    return [t.detach().to(device="cpu", dtype=torch.float64) for t in ts]


def mach_eps(dtype: torch.dtype) -> float:
    """Machine eps of the storage dtype: the kernel runs in float64, the results are rounded to it."""
    return torch.finfo(dtype).eps


def max_rel(x: torch.Tensor, scale: torch.Tensor | float) -> float:
    return float(x.abs().max() / scale) if x.numel() else 0.0


def balance_tolerance(A, B, A2, B2, dtype: torch.dtype) -> torch.Tensor:
    r"""A bound on ``||A'A'^T - B'^T B'||_2`` for a full-rank pair (float64 tensors; ``dtype``:
    the storage dtype of ``A'``, ``B'``), from the perturbation theory of the kernel's four float64
    symmetric eigendecompositions, each with a backward error ``||E|| <= p eps ||M||``, ``p = r``.

    ``kappa = cond(B A) = sigma_1 / sigma_r``, ``kappa_a = cond(A)``. The general kernel
    (:func:`reflora._linalg.balanced_metric`) builds ``S`` from ``eigh(X)`` (#1, ``X = A A^T``) and
    ``eigh(M)`` (#2, ``M = diag(a) V_A^T Y V_A diag(a)``, ``Z^T Y Z = Sigma^2``), takes
    ``S^{+-1/2}`` from ``eigh(S)`` (#3) and rotates by the eigenbasis of the balanced Gram (#4).
    Exactly, ``A'A'^T - B'^T B' = V^T S^{-1/2} (S X S - Y) S^{-1/2} V`` for any ``S`` and rotation
    ``V``, so #4 adds nothing and the balance is the Riccati residual of the computed ``S``,
    weighted by ``S^{-1/2}``. In the basis ``Z``, where that weight is ``Sigma^{-1/2}``:

    * #2: ``Z^T Y Z = Sigma^2 + E_2``, ``||E_2|| <= p eps sigma_1^2``, leaves a residual
      ``E_2[i, j] (sigma_i / sigma_j + sigma_j / sigma_i + 1)``; weighted by
      ``(sigma_i sigma_j)^{-1/2}`` the ``(1, r)`` entry is ``3 p eps sigma_1 kappa^{3/2}``. This is
      the ``cond^1.5`` growth the test's earlier fit measured.
    * #1: ``||E_1|| <= p eps ||X||`` moves ``S`` by ``2 p eps sigma_1 kappa_a^2`` in that norm.
    * #3: ``S`` is conditioned like ``cond(P)^2 <= kappa_a^2 kappa``; its backward error gives
      ``2 p eps sigma_1 kappa_a^2 kappa``.
    * The dead-direction complement: ``S = L^T L + C^T C`` with ``C = I - R L``, zero in exact
      arithmetic on a full-rank pair but ``C = -Z Sigma^{-2} E_2 Z^{-1}`` computed, ``||C|| <=
      p eps kappa_a kappa^2``. It is the identity metric of the dead directions, so it enters ``S``
      (whose scale is ``||B|| / ||A||``) unscaled: weighted, its ``(1, r)`` entry is up to
      ``2 (p eps kappa_a kappa^2)^2 ||A||_2^2 kappa^{1/2}``. It grows like ``kappa^{4.5}`` against
      #2's ``kappa^{1.5}`` and overtakes it at ``kappa ~ (sigma_1 / (p eps ||A||_2^2))^{1/3}``:
      about 3e5 for a balanced pair (``||A||_2^2 ~ sigma_1``), the growth between 3e5 and 1e6
      that broke the fit, and sooner where ``||A|| >> ||B||``. (Eager CPU steps of ``attach``
      take the two-eigh shortcut for all-live pairs, which has no complement.)
    * Applying ``P^T``, ``P^{-T}`` in float64: ``2 p eps cond(P) (||A'||_F^2 + ||B'||_F^2)``,
      ``cond(P) <= kappa_a kappa^{1/2}``; rounding ``A'``, ``B'`` to ``dtype``:
      ``2 eps_dtype (||A'||_F^2 + ||B'||_F^2)``.
    """
    r = A.shape[-2]
    p, eps = r, torch.finfo(torch.float64).eps
    sv = torch.linalg.svdvals(B @ A)
    s1, kappa = sv[..., 0], sv[..., 0] / sv[..., r - 1]
    sa = torch.linalg.svdvals(A)
    a1, kappa_a = sa[..., 0], sa[..., 0] / sa[..., r - 1]
    total = A2.square().sum((-2, -1)) + B2.square().sum((-2, -1))
    eighs = p * eps * s1 * (2 * kappa_a**2 + 3 * kappa**1.5 + 2 * kappa_a**2 * kappa)
    complement = 2 * (p * eps * kappa_a * kappa**2) ** 2 * a1**2 * kappa**0.5
    applying = 2 * p * eps * kappa_a * kappa**0.5 * total + 2 * mach_eps(dtype) * total
    return eighs + complement + applying


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs())
def test_full_refactor_invariants(spec: PairSpec, dev: str) -> None:
    A, B = build(spec, dev)
    A2, B2 = refactor(A, B)
    assert isinstance(A2, torch.Tensor) and A2.dtype == A.dtype and B2.dtype == B.dtype
    assert A2.shape == A.shape and B2.shape == B.shape
    assert A2.device == A.device
    assert torch.isfinite(A2).all() and torch.isfinite(B2).all()

    A, B, A2, B2 = f64(A, B, A2, B2)
    W = B @ A
    scale = A.flatten(-2).norm(dim=-1) * B.flatten(-2).norm(dim=-1)
    scale2 = A2.flatten(-2).norm(dim=-1) * B2.flatten(-2).norm(dim=-1)
    sv = torch.linalg.svdvals(W)  # (..., min(m, n))
    eps = mach_eps(spec.dtype)

    # product preserved up to the rounding of A', B' to the storage dtype and round-off in
    # P^{-T} P^T = I, which grows with the conditioning of P (at most that of the factors)
    err = (B2 @ A2 - W).flatten(-2).abs().amax(-1)
    tol_p = 64 * eps * (scale + scale2) * (spec.cond_a * spec.cond_b) ** 0.5
    assert (err <= tol_p).all(), (err / tol_p).max()

    # Well posed (B A of full rank r, every direction live, cond_a * cond_b <= 1e6: near 1e7 the
    # smallest squared singular value reaches the dead threshold, 1.4e-14 of the scale): balanced,
    # with Gram eigenvalues = singular values of B A, and optimal: ||A'||^2 + ||B'||^2 = 2 ||B A||_*.
    # Rank-deficient products (r > min(m, n)) have dead directions, left as they are: see the
    # dead-direction tests. The tolerance is the bound of balance_tolerance, derived there.
    if spec.r <= min(spec.m, spec.n) and spec.cond_a * spec.cond_b <= 1e6:
        tol = balance_tolerance(A, B, A2, B2, spec.dtype)
        G1, G2 = A2 @ A2.mT, B2.mT @ B2
        bal = torch.linalg.matrix_norm(G1 - G2, ord=2)
        assert (bal <= tol).all(), (bal / tol).max()
        # against the reference singular values of B A, whose own backward error is about
        # min(m, n) eps64 sigma_1 each; B A has rank r, so its nuclear norm sums the top r (the
        # other min(m, n) - r computed values are round-off of zeros)
        ref = min(spec.m, spec.n) * torch.finfo(torch.float64).eps * sv[..., 0]
        ev = torch.linalg.eigvalsh(G1).flip(-1)
        assert ((ev - sv[..., : spec.r]).abs() <= (tol + ref)[..., None]).all()
        total = A2.square().sum((-2, -1)) + B2.square().sum((-2, -1))
        assert ((total - 2 * sv[..., : spec.r].sum(-1)).abs() <= tol + 2 * spec.r * ref).all()


@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs(full_rank=True, max_cond=30.0, max_r=32, max_dim=128))
def test_invariant_to_starting_factorization(spec: PairSpec, dev: str) -> None:
    """Refactoring (R A, B R^-1) gives the same product, balanced spectrum and W-step."""
    A, B = build(spec, dev)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    R = torch.randn(spec.r, spec.r, generator=gen, dtype=torch.float64)
    Q1, _, Q2 = torch.linalg.svd(R)
    s = torch.logspace(0, 0.6, spec.r, dtype=torch.float64)  # cond(R) = 4
    R = ((Q1 * s) @ Q2).to(device=dev, dtype=spec.dtype)
    RA = R @ A
    BRi = torch.linalg.solve(R.double().mT, B.double().mT).mT.to(spec.dtype)
    G = torch.randn(*spec.batch, spec.n, spec.m, generator=gen, dtype=torch.float64).to(dev, spec.dtype)

    out1, out2 = refactor(A, B), refactor(RA, BRi)
    a1, b1, a2, b2 = f64(*out1, *out2)
    scale = float(a1.norm() * b1.norm())
    # Gram-based methods lose accuracy with the squared condition number of the factors
    kappa = max(float(torch.linalg.cond(t).max()) for t in f64(A, B, RA, BRi))
    tol = 64 * mach_eps(spec.dtype) * kappa**2
    assert max_rel(b1 @ a1 - b2 @ a2, scale) <= tol
    e1 = torch.linalg.eigvalsh(a1 @ a1.mT)
    e2 = torch.linalg.eigvalsh(a2 @ a2.mT)
    assert max_rel(e1 - e2, e1.abs().max()) <= tol

    def w_step(A_, B_):
        gA, gB = B_.mT @ G, G @ A_.mT
        pA, pB = precondition(A_, B_, gA, gB)
        pA, pB, A64, B64 = f64(pA, pB, A_, B_)
        return pB @ A64 + B64 @ pA

    d1, d2 = w_step(A, B), w_step(RA, BRi)
    assert max_rel(d1 - d2, d1.abs().max()) <= 4 * tol


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs(dtypes=(torch.float64,), full_rank=True, max_cond=100.0))
def test_preconditioner_solves_riccati(spec: PairSpec, dev: str, solver: str) -> None:
    """S is symmetric positive definite and S (A A^T) S = B^T B (either solver)."""
    A, B = build(spec, dev)
    S, S_inv = f64(*preconditioner(A, B, solver=solver))
    A, B = f64(A, B)
    X, Y = A @ A.mT, B.mT @ B
    assert max_rel(S - S.mT, S.abs().max()) <= 1e-10
    assert (torch.linalg.eigvalsh(0.5 * (S + S.mT)) > 0).all()
    assert max_rel(S @ X @ S - Y, Y.abs().max()) <= 1e-7
    eye = torch.eye(spec.r, dtype=torch.float64)
    assert max_rel(S @ S_inv - eye, 1.0) <= 1e-7


@given(spec=pair_specs(full_rank=True, max_cond=10.0))
def test_already_balanced_gives_identity(spec: PairSpec) -> None:
    A, B = refactor(*build(spec))
    S, S_inv = f64(*preconditioner(A, B))
    eye = torch.eye(spec.r, dtype=torch.float64).expand_as(S)
    kappa2 = float(torch.linalg.cond(f64(A)[0]).max()) ** 2  # = cond(B A) for a balanced pair
    tol = 1e3 * mach_eps(spec.dtype) * max(kappa2, 10.0)
    assert max_rel(S - eye, 1.0) <= tol
    assert max_rel(S_inv - eye, 1.0) <= tol


@given(
    spec=pair_specs(dtypes=(torch.float64,), full_rank=True, max_cond=10.0, max_r=8, max_dim=32, batch=False),
    variant=st.sampled_from(VARIANTS),
)
def test_precondition_equals_refactor_for_gradient_descent(spec: PairSpec, variant: str) -> None:
    """For plain GD, precondition-then-step and refactor-then-step trace the same W (20 steps)."""
    A0, B0 = build(spec)
    gen = torch.Generator().manual_seed(spec.seed + 7)
    target = torch.randn(spec.n, spec.r, generator=gen, dtype=torch.float64) @ torch.randn(
        spec.r, spec.m, generator=gen, dtype=torch.float64
    )

    def grads(A, B):
        G = B @ A - target
        return B.mT @ G, G @ A.mT

    scale = float((B0 @ A0).norm() + target.norm())
    lr = 0.02 / scale
    A1, B1 = A0.clone(), B0.clone()
    A2, B2 = A0.clone(), B0.clone()
    for _ in range(20):
        gA, gB = precondition(A1, B1, *grads(A1, B1), variant=variant)
        A1, B1 = A1 - lr * gA, B1 - lr * gB
        Ar, Br, gAr, gBr = refactor(A2, B2, grads(A2, B2), variant=variant)
        A2, B2 = Ar - lr * gAr, Br - lr * gBr
    W1, W2 = B1 @ A1, B2 @ A2
    assert max_rel(W1 - W2, W1.abs().max()) <= 1e-8
    assert not torch.equal(W1, B0 @ A0)


# --------------------------------------------------------------------------- scalar variant


@pytest.mark.parametrize("dev", DEVICES)
@given(spec=pair_specs(max_cond=10.0))
def test_scalar_equalizes_norms(spec: PairSpec, dev: str) -> None:
    A, B = build(spec, dev)
    A2, B2 = refactor(A, B, variant="scalar")
    A, B, A2, B2 = f64(A, B, A2, B2)
    na, nb = A2.flatten(-2).norm(dim=-1), B2.flatten(-2).norm(dim=-1)
    tol = 16 * mach_eps(spec.dtype)
    assert ((na - nb).abs() <= tol * (na + nb)).all()
    assert max_rel(B2 @ A2 - B @ A, (B @ A).abs().max()) <= 64 * mach_eps(spec.dtype)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    pA, pB = precondition(A, B, gA, gB, variant="scalar")
    p2 = (B.flatten(-2).norm(dim=-1) / A.flatten(-2).norm(dim=-1))[..., None, None]
    assert torch.allclose(pA, gA / p2) and torch.allclose(pB, gB * p2)


@given(spec=pair_specs(dtypes=(torch.float64,), max_r=8, max_dim=24, batch=False, max_cond=10.0),
       steps=st.integers(1, 6))
def test_scalar_adam_state_transport_is_exact(spec: PairSpec, steps: int) -> None:
    """Transported Adam moments equal those of an Adam fed the rescaled gradients all along,
    so the next per-coordinate Adam update is unchanged by the refactor."""
    A, B = build(spec)
    T = refactor_transform(A, B, variant="scalar")
    gen = torch.Generator().manual_seed(spec.seed + 3)
    gs = [(torch.randn(A.shape, generator=gen, dtype=A.dtype), torch.randn(B.shape, generator=gen, dtype=B.dtype))
          for _ in range(steps + 1)]

    def run(params, grad_list):
        opt = torch.optim.Adam(params, lr=1e-2, eps=0.0)
        for gA, gB in grad_list:
            params[0].grad, params[1].grad = gA.clone(), gB.clone()
            opt.step()
        return opt

    P_orig = [A.clone().requires_grad_(), B.clone().requires_grad_()]
    opt = run(P_orig, gs[:steps])
    A2, B2 = refactor(A, B, variant="scalar")
    P_new = [A2.clone().requires_grad_(), B2.clone().requires_grad_()]
    opt_new = run(P_new, [map_first_moments(T, gA, gB) for gA, gB in gs[:steps]])

    sA, sB = opt.state[P_orig[0]], opt.state[P_orig[1]]
    mA, mB = map_first_moments(T, sA["exp_avg"], sB["exp_avg"])
    vA, vB = map_second_moments(T, sA["exp_avg_sq"], sB["exp_avg_sq"])
    nA, nB = opt_new.state[P_new[0]], opt_new.state[P_new[1]]
    for got, want in ((mA, nA["exp_avg"]), (mB, nB["exp_avg"]), (vA, nA["exp_avg_sq"]), (vB, nB["exp_avg_sq"])):
        assert torch.allclose(got, want, rtol=1e-10, atol=0)
    # with eps = 0 Adam's per-coordinate update is invariant: the next step moves A' by what A moves
    before = P_orig[0].detach().clone(), P_new[0].detach().clone()
    run_state = torch.optim.Adam([P_new[0]], lr=1e-2, eps=0.0)
    run_state.state[P_new[0]] = {"step": sA["step"].clone(), "exp_avg": mA, "exp_avg_sq": vA}
    gA_next, _ = map_first_moments(T, *gs[steps])
    P_new[0].grad = gA_next
    run_state.step()
    P_orig[0].grad = gs[steps][0].clone()
    opt.step()
    dA = P_orig[0].detach() - before[0]
    dA2 = P_new[0].detach() - before[1]
    assert torch.allclose(dA, dA2, rtol=1e-8, atol=1e-14)


def test_full_first_moment_map_is_exact_covector_map() -> None:
    """<m_A', dA'> = <m_A, dA> for dA' = P^T dA: first moments transform as gradients."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(15, 6, generator=g, dtype=torch.float64)
    T = refactor_transform(A, B)
    mA, mB = torch.randn_like(A), torch.randn_like(B)
    dA, dB = torch.randn_like(A), torch.randn_like(B)
    mA2, mB2 = map_first_moments(T, mA, mB)
    # perturbations transform like the parameters: dA' = left dA, dB' = dB right
    assert torch.allclose((mA2 * (T.left @ dA)).sum(), (mA * dA).sum())
    assert torch.allclose((mB2 * (dB @ T.right)).sum(), (mB * dB).sum())
    vA, vB = map_second_moments(T, mA.square(), mB.square())
    assert (vA >= 0).all() and (vB >= 0).all()
    kA, kB = map_second_moments(T, mA, mB, rule="keep")
    assert torch.equal(kA, mA) and kA is not mA
    zA, zB = map_second_moments(T, mA, mB, rule="reset")
    assert not zA.any() and not zB.any()


# --------------------------------------------------------------------------- batching and dtypes


@pytest.mark.parametrize("variant", VARIANTS)
@given(spec=pair_specs(max_r=16, max_dim=64, max_cond=100.0))
def test_batched_equals_loop_and_vmap(spec: PairSpec, variant: str) -> None:
    A, B = build(spec)
    A = A.reshape(-1, spec.r, spec.m)
    B = B.reshape(-1, spec.n, spec.r)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    batched = refactor(A, B, (gA, gB), variant=variant)
    assert isinstance(batched, RefactoredWithGrads)
    looped = [refactor(A[i], B[i], (gA[i], gB[i]), variant=variant) for i in range(A.shape[0])]
    vmapped = torch.func.vmap(lambda a, b, x, y: refactor(a, b, (x, y), variant=variant))(A, B, gA, gB)
    pre = precondition(A, B, gA, gB, variant=variant)
    pre_v = torch.func.vmap(lambda a, b, x, y: precondition(a, b, x, y, variant=variant))(A, B, gA, gB)
    # the paper frame's tie-breaker bounds the eigenvectors' sensitivity to round-off (~1e-8;
    # up to ~3e-5 where dead directions, r > min(m, n), leave a degenerate block to it)
    rel = max(1e3 * mach_eps(spec.dtype), 1e-6 if spec.r <= min(spec.m, spec.n) else 1e-4)
    tol = dict(rtol=rel, atol=rel * float(A.abs().max() + B.abs().max() + 1))
    for k in range(4):
        assert torch.allclose(vmapped[k], batched[k], **tol)
    # the symmetric frame is unique: batched and per-pair results agree factor by factor
    for i, lp in enumerate(looped):
        for k in range(4):
            assert torch.allclose(lp[k], batched[k][i], **tol)
    for x, y in zip(pre, pre_v):
        assert torch.allclose(x, y, **tol)
    single = precondition(A[0], B[0], gA[0], gB[0], variant=variant)[0]
    assert torch.allclose(pre[0][0], single, **tol)


def test_batch_dims_broadcast() -> None:
    A = torch.randn(3, 1, 4, 10, dtype=torch.float64)
    B = torch.randn(5, 7, 4, dtype=torch.float64)
    A2, B2 = refactor(A, B)
    assert A2.shape == (3, 5, 4, 10) and B2.shape == (3, 5, 7, 4)
    assert torch.allclose(B2 @ A2, B @ A)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_is_computed_in_float64_and_cast_back(dtype, variant, device) -> None:
    g = torch.Generator().manual_seed(1)
    A = (3 * torch.randn(2, 8, 96, generator=g)).to(device, dtype)
    B = (0.05 * torch.randn(2, 48, 8, generator=g)).to(device, dtype)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    out = refactor(A, B, (gA, gB), variant=variant)
    assert all(t.dtype == dtype for t in out)
    assert all(torch.isfinite(t).all() for t in out)
    pre = precondition(A, B, gA, gB, variant=variant)
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in pre)
    W, W2 = (B.double() @ A.double()), (out.B.double() @ out.A.double())
    # the only error beyond float64 is the final rounding of A', B' to the half dtype
    assert max_rel(W2 - W, W.abs().max()) <= 16 * torch.finfo(dtype).eps
    # the same inputs given as float32 give the same up to that rounding
    ref = refactor(A.float(), B.float(), variant=variant)
    assert torch.allclose(out.A.float(), ref.A.to(dtype).float())


# --------------------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_B_like_peft_init(variant, solver, device) -> None:
    A = torch.randn(4, 32, device=device)
    B = torch.zeros(16, 4, device=device)
    A2, B2 = refactor(A, B, variant=variant, solver=solver)
    assert torch.equal(A2, A) and torch.equal(B2, B)
    gA, gB = torch.zeros_like(A), torch.randn_like(B)
    pA, pB = precondition(A, B, gA, gB, variant=variant, solver=solver)
    assert torch.equal(pB, gB) and torch.equal(pA, gA)
    # and the same with A = 0, B != 0
    A2, B2 = refactor(torch.zeros_like(A), torch.randn_like(B), variant=variant, solver=solver)
    assert not A2.any() and torch.isfinite(B2).all()


@pytest.mark.parametrize(
    "variant,solver", [("full", "eigh"), ("full", "newton_schulz"), ("scalar", "eigh")]
)  # the scalar variant ignores the solver
@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_trains_from_B_zero_without_warmup(variant, solver, space) -> None:
    """PEFT init (A random, B = 0), no warmup: loss falls, nothing becomes NaN."""
    g = torch.Generator().manual_seed(0)
    n, m, r = 24, 40, 4
    target = torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g) / r**0.5
    A = (torch.rand(r, m, generator=g) - 0.5) * 2 / m**0.5
    B = torch.zeros(n, r)
    A.requires_grad_(); B.requires_grad_()
    opt = torch.optim.Adam([A, B], lr=1e-2)
    losses = []
    for _ in range(150):
        loss = 0.5 * (B @ A - target).square().sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            if space == "gradient":
                gA, gB = precondition(A, B, A.grad, B.grad, variant=variant, solver=solver)
                A.grad.copy_(gA); B.grad.copy_(gB)
            else:
                T = refactor_transform(A, B, variant=variant, solver=solver)
                A2, B2 = apply_transform(T, A, B)
                gA, gB = map_first_moments(T, A.grad, B.grad)
                A.copy_(A2); B.copy_(B2); A.grad.copy_(gA); B.grad.copy_(gB)
                if opt.state:  # Adam's moments follow the factors into the new coordinates
                    sA, sB = opt.state[A], opt.state[B]
                    for key, fn in (("exp_avg", map_first_moments), ("exp_avg_sq", map_second_moments)):
                        xA, xB = fn(T, sA[key], sB[key])
                        sA[key].copy_(xA); sB[key].copy_(xB)
        opt.step()
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert losses[-1] < 0.05 * losses[0]


@pytest.mark.parametrize(
    "variant,solver", [("full", "eigh"), ("full", "newton_schulz"), ("scalar", "eigh")]
)
def test_non_finite_pair_is_isolated(variant, solver) -> None:
    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 6, 30, generator=g)
    B = torch.randn(4, 20, 6, generator=g)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    A_bad = A.clone(); A_bad[1, 0, 0] = float("nan")
    B_bad = B.clone(); B_bad[2, 3, 1] = float("inf")
    out = refactor(A_bad, B_bad, (gA, gB), variant=variant, solver=solver)
    ref = refactor(A, B, (gA, gB), variant=variant, solver=solver)
    for k in range(4):
        assert torch.isnan(out[k][1]).all() and torch.isnan(out[k][2]).all()
        for i in (0, 3):
            assert torch.allclose(out[k][i], ref[k][i], atol=1e-5)
    pre = precondition(A_bad, B_bad, gA, gB, variant=variant, solver=solver)
    pre_ref = precondition(A, B, gA, gB, variant=variant, solver=solver)
    for k in range(2):
        assert not torch.isfinite(pre[k][1]).all()
        assert torch.allclose(pre[k][0], pre_ref[k][0]) and torch.allclose(pre[k][3], pre_ref[k][3])
    # a non-finite gradient only touches its own pair too
    gA_bad = gA.clone(); gA_bad[0, 0, 0] = float("inf")
    pre = precondition(A, B, gA_bad, gB, variant=variant, solver=solver)
    assert torch.allclose(pre[0][1:], pre_ref[0][1:])


def test_inputs_are_not_mutated() -> None:
    A, B = torch.randn(3, 4, 9), torch.randn(3, 7, 4)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    copies = [t.clone() for t in (A, B, gA, gB)]
    refactor(A, B, (gA, gB))
    precondition(A, B, gA, gB, variant="scalar")
    for t, c in zip((A, B, gA, gB), copies):
        assert torch.equal(t, c)


def test_return_types() -> None:
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    out = refactor(A, B)
    assert isinstance(out, Refactored) and len(out) == 2
    out = refactor(A, B, (torch.ones_like(A), torch.ones_like(B)))
    assert isinstance(out, RefactoredWithGrads) and len(out) == 4
    assert out[0] is out.A
