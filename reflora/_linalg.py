"""Small symmetric eigen-routines and the Gram-level RefLoRA kernel shared by the core.

Everything here works on batches of small ``(r, r)`` matrices, is pure and traceable (no
``.item()``, no Python branches on values). It runs in float64 whatever the factors' dtype:
the Gram matrices square the condition number of the factors, so a float32 Gram of a factor
with condition number 1e3 has already lost the small eigenvalues (measured: 1-2% error in ``S``
from a float32 Gram even with a float64 eigensolver, against 1e-9 from a float64 Gram).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["balanced_metric", "compute_dtype", "default_eps", "safe_eigh", "sym_eigh"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Grams and of the r x r kernel: float64 for every input dtype.

    ``eigh`` has no half-precision kernels, and float32 is too short for Grams of factors
    with condition numbers of 1e3 (see the module docstring). The O((m + n) r^2) Gram products
    in float64 cost about twice the float32 ones on a CPU.
    """
    return torch.float64


def default_eps(dtype: torch.dtype | None = None) -> float:
    """Relative threshold below which a direction of ``B A`` counts as zero (``eps=None``).

    A squared singular value ``sigma_j^2`` of ``B A`` computed from float64 Grams carries an
    absolute error of a few ``machine_eps * ||A||_2^2 ||B||_F^2``; anything below
    ``64 * machine_eps`` (1.4e-14) of that scale is indistinguishable from zero. The argument is
    accepted for backward compatibility and ignored: the kernel always runs in float64.
    """
    return 64.0 * torch.finfo(torch.float64).eps


def safe_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of a batch of symmetric PSD matrices that never raises on bad values.

    LAPACK may report a convergence failure (and torch then raises) for a matrix holding
    NaN or Inf. Such matrices are replaced by the identity before the call; the caller is
    responsible for masking the corresponding outputs. Eigenvalues come back clamped at zero:
    round-off makes them slightly negative, and their square roots would be NaN.
    """
    ok = torch.isfinite(gram).flatten(-2).all(-1)[..., None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = torch.where(ok, gram, eye)
    evals, evecs = sym_eigh(gram)
    return evals.clamp_min(0.0), evecs


def sym_eigh(mat: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part (eigh reads one triangle; products are symmetric only to round-off)."""
    return torch.linalg.eigh(0.5 * (mat + mat.mT))


def _canonical_signs(V: Tensor) -> Tensor:
    """Flip eigenvector columns so that the entry of largest magnitude in each is positive."""
    idx = V.abs().argmax(-2, keepdim=True)
    sign = torch.where(V.gather(-2, idx) < 0, -1.0, 1.0).to(V.dtype)
    return V * sign


def balanced_metric(
    X: Tensor, Y: Tensor, eps: float, frame: str = "paper"
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""RefLoRA's refactoring from the Grams ``X = A A^T`` and ``Y = B^T B`` (float64, batched).

    Returns, for finite ``X`` and ``Y``, ``(left, right, S, S_inv, live)`` with ``A' = left @ A``,
    ``B' = B @ right``, ``left @ right^T = I``, ``S = left^T left`` and ``live`` the number of live
    directions.

    The paper's ``S`` solves ``S X S = Y`` (the geometric mean ``X^{-1} # Y``), which exists only
    when ``B A`` has full rank ``r``. Here the directions are split by the singular values
    ``sigma_j`` of ``B A``: a direction is *live* when ``sigma_j^2 > eps ||A||_2^2 ||B||_F^2`` and
    *dead* otherwise (``B = 0`` at PEFT's init: all dead; ``r > min(m, n)``: at least
    ``r - min(m, n)`` dead). With ``Z = V_A diag(a) V_M`` (``eigh(X) = V_A diag(a^2) V_A^T``,
    ``eigh(diag(a) V_A^T Y V_A diag(a)) = V_M diag(sigma^2) V_M^T``, so ``Z^T Y Z = diag(sigma^2)``)::

        R = Z diag(sigma^{-1/2})            live columns of P^{-T}   (= A W Sigma^{-1/2})
        L = diag(sigma^{-3/2}) Z^T Y        live rows of P^T         (= Sigma^{-1/2} U^T B)
        Pi = R L                            oblique projector onto the live directions
        S = L^T L + (I - Pi)^T (I - Pi)     the geometric mean on the live directions,
                                            the identity metric on the dead ones

    For a full-rank product this is the paper's ``S`` exactly; with no live direction it is
    ``I`` (plain LoRA), which is how ``B = 0`` is handled. No inverse of ``a`` is taken, so a
    rank-deficient ``A`` (``r > m``) is fine; ``sigma^{-1/2}`` and ``sigma^{-3/2}`` are taken on live
    directions only.

    ``frame`` picks the factorization among the ``P`` with ``P P^T = S`` (all give the same
    gradient step; they differ only for optimizers that are not rotation-equivariant, e.g. Adam):

    * ``"paper"`` (default): ``P = S^{1/2} V_G``, rotated so that ``A' A'^T = B'^T B' =
      diag(sigma)`` as in the paper's closed form. ``V_G`` is made canonical: a tiny fixed
      tie-breaker orders (near-)repeated eigenspaces by coordinate, and each column's largest
      entry is made positive, so eager, compiled, other devices and ranks agree to round-off.
      Measured to train markedly better under AdamW than the symmetric frame.
    * ``"symmetric"``: ``P = S^{1/2}``, the one closest to the identity: unique with no
      convention needed, and an already balanced pair is left exactly as it is.
    """
    cd = X.dtype
    eye = torch.eye(X.shape[-1], dtype=cd, device=X.device)
    # X and Y are finite here (full_kernel masks non-finite pairs), so plain eigh is safe
    lam_a, V_a = sym_eigh(X)
    lam_a = lam_a.clamp_min(0.0)
    Z0 = V_a * lam_a.sqrt()[..., None, :]
    sig2, V_m = sym_eigh(Z0.mT @ Y @ Z0)
    sig2 = sig2.clamp_min(0.0)
    Z = Z0 @ V_m
    scale = lam_a.amax(-1, keepdim=True) * Y.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    live = sig2 > eps * scale
    sig = torch.where(live, sig2, 1.0).sqrt()
    w_r = torch.where(live, sig.rsqrt(), 0.0)
    w_l = torch.where(live, sig.pow(-1.5), 0.0)
    R = Z * w_r[..., None, :]
    L = (Y @ Z * w_l[..., None, :]).mT
    C = eye - R @ L
    S = L.mT @ L + C.mT @ C
    s, V = sym_eigh(S)
    s = s.clamp_min(torch.finfo(cd).tiny)
    root = s.sqrt()
    left = (V * root[..., None, :]) @ V.mT  # S^{1/2}
    right = (V / root[..., None, :]) @ V.mT  # S^{-1/2}
    S_inv = (V / s[..., None, :]) @ V.mT
    if frame == "paper":
        # Rotate into the eigenbasis of the balanced Gram B'^T B' (= A'A'^T on a full-rank pair;
        # on a rank-deficient one it is diag(sigma) on the live block and 0 on the dead one).
        # Canonical choice: a tie-breaker delta * diag(r-1, ..., 0) fixes the basis inside
        # (near-)repeated eigenspaces (the dead block among them) to the one that orders the
        # coordinates. Round-off in G is about machine_eps * cond(S) of its mean eigenvalue, so
        # delta = max(1e-9, 1e-10 cond(S)) of the mean bounds every eigenvector's sensitivity to
        # round-off by ~1e-6 while rotating a basis with eigenvalue gap g by only ~delta / g
        # (the balanced Grams are diagonal to that level); then each column's largest entry is
        # made positive.
        G = right.mT @ Y @ right
        r = G.shape[-1]
        rel = (1e-10 * s.amax(-1, keepdim=True) / s.amin(-1, keepdim=True)).clamp(1e-9, 1e-3)
        delta = rel * G.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
        ramp = torch.arange(r - 1, -1, -1, dtype=cd, device=G.device)
        # eigenvectors of -G come in descending order of G's eigenvalues, like the singular values
        _, V_g = sym_eigh(-(G + torch.diag_embed(delta * ramp)))
        V_g = _canonical_signs(V_g)
        left, right = V_g.mT @ left, right @ V_g
    # no live direction (B = 0, A = 0): exactly the identity, not eigh's round-off of it
    any_live = live.any(-1)[..., None, None]
    left, right, S, S_inv = (torch.where(any_live, t, eye) for t in (left, right, S, S_inv))
    return left, right, S, S_inv, live.sum(-1)
