"""Small symmetric eigen-routines and the Gram-level RefLoRA kernel shared by the core.

Everything here works on batches of small ``(r, r)`` matrices, is pure and traceable (no
``.item()``, no Python branches on values). It runs in float64 whatever the factors' dtype:
the Gram matrices square the condition number of the factors, so a float32 Gram of a factor
with condition number 1e3 has already lost the small eigenvalues (docs/theory.md).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["BLOCK_FLOOR", "balanced_metric", "block_metric", "compute_dtype", "live_metric", "newton_schulz_geomean", "newton_schulz_metric", "newton_schulz_sqrt", "resolved_gate", "sym_eigh"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Grams and of the r x r kernel: float64 for every input dtype.

    ``eigh`` has no half-precision kernels, and float32 is too short for Grams of factors
    with condition numbers of 1e3 (see the module docstring). The O((m + n) r^2) Gram products
    in float64 cost about twice the float32 ones on a CPU.
    """
    return torch.float64


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; a plain ``bmm`` for two 3-D stacks (``matmul`` adds three view/expand calls per
    product, which count when the matrices are r x r)."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def sym_eigh(mat: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part (eigh reads one triangle; products are symmetric only to round-off)."""
    return torch.linalg.eigh(0.5 * (mat + mat.mT))


def _canonical_signs(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Flip matching (row of ``left``, column of ``right``) pairs so that the entry of largest
    magnitude in each column of ``right`` is positive (``right @ left`` is unchanged)."""
    sign = right.gather(-2, right.abs().argmax(-2, keepdim=True)).sign()  # never 0: right is invertible
    return left * sign.mT, right * sign


# Relative eigenvalue gap of the balanced Gram (a fraction of its mean eigenvalue) below which
# the paper frame's tie-breaker is applied; above it the exact eigenbasis is used (see
# balanced_metric). Scaled up with the conditioning so that round-off in the Gram, about
# machine_eps * cond(S) of its mean, moves the exact eigenvectors by at most ~1e-10.
_GAP_MIN = 1e-4
_GAP_PER_COND = 1e-6


def live_basis(X: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lam_a, sig2, Z, live)``: the two eigendecompositions every form of the kernel starts with.

    ``eigh(X) = V_A diag(lam_a) V_A^T``; ``Z = V_A diag(lam_a^{1/2}) V_M`` with
    ``eigh(diag(lam_a^{1/2}) V_A^T Y V_A diag(lam_a^{1/2})) = V_M diag(sig2) V_M^T``, so that
    ``Z^T Y Z = diag(sig2)`` (``sig2`` ascending: the squared singular values of ``B A``);
    ``live = sig2 > eps ||A||_2^2 ||B||_F^2``.
    """
    # eigh reads the lower triangle; X and Y are symmetric Grams, and M is symmetric to round-off
    lam_a, V_a = torch.linalg.eigh(X)
    lam_a = lam_a.clamp_min(0.0)
    Z0 = V_a * lam_a.sqrt().unsqueeze(-2)
    sig2, V_m = torch.linalg.eigh(mm(mm(Z0.mT, Y), Z0))
    sig2 = sig2.clamp_min(0.0)
    scale = eps * lam_a[..., -1:] * Y.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    return lam_a, sig2, mm(Z0, V_m), sig2 > scale


def resolved_gate(sig2: Tensor, resolved: float) -> Tensor:
    r"""Per pair: whether RefLoRA acts, i.e. ``sigma_min >= resolved * sigma_max`` for the singular
    values ``sigma`` of ``B A`` (``sig2``: their squares, ascending, as ``_live_basis`` returns).

    ``resolved = 0`` always acts (the paper). A pair that fails the test is left as it is (the
    identity transform, ``S = I``: a plain LoRA step). Why: balancing a pair whose product has
    directions far below its largest one shrinks both factors to ``sigma_j^{1/2}`` on those
    directions, and the paper frame then puts every live direction on its own coordinate, so an
    element-wise optimizer (Adam) spends its per-coordinate step on ``r - k`` coordinates that
    carry no gradient; see ``docs/rank-deficient.md``. A pair with ``B = 0`` (all
    ``sigma = 0``) passes the test and gets the identity from the dead-direction rule anyway; a
    non-finite one (NaN ``sigma``) passes too, so that it still comes out as NaN.
    """
    return ~(sig2[..., 0] < (resolved * resolved) * sig2[..., -1])


def _separated(lam_a: Tensor, sig2: Tensor, live: Tensor) -> Tensor:
    """Per pair: every direction is live and the singular values of ``B A`` are apart by at least
    ``max(1e-4, 1e-6 c)`` of their mean, ``c = cond(A A^T) sigma_max / sigma_min >= cond(S)``: the
    exact eigenbasis of the balanced Gram is then well determined and the paper frame uses it."""
    sig = sig2.sqrt()  # ascending, like lam_a
    # a zero eigenvalue makes cond inf or NaN: such a pair has a dead direction and fails anyway
    cond = (lam_a[..., -1] * sig[..., -1]) / (lam_a[..., 0] * sig[..., 0])
    gap = sig.diff(dim=-1).amin(-1) if sig.shape[-1] > 1 else sig[..., 0]
    tau = (_GAP_PER_COND * cond).clamp(_GAP_MIN, 1.0)
    # live is monotone in the ascending sig2: every direction is live iff the smallest is
    return live[..., 0] & (gap >= tau * sig.mean(-1))


def live_metric(
    X: Tensor, Y: Tensor, eps: float, frame: str | None, metric: bool = True, resolved: float = 0.0
) -> tuple[tuple[Tensor, ...], Tensor]:
    r"""The kernel for pairs whose directions are all live: two eigendecompositions, no third.

    Returns ``(out, ok)``: ``out`` is ``(left, right, S, S_inv)`` in the paper frame
    (``frame="paper"``; ``(left, right)`` with ``metric=False``) or ``(S, S_inv)``
    (``frame=None``: gradient space), and ``ok`` says per pair whether that answer is the one
    :func:`balanced_metric` defines (``out`` is meaningless where it is False: a dead direction,
    or for the paper frame, singular values too close for the exact eigenbasis, where
    ``balanced_metric`` applies its tie-breaker). With every direction live, ``Z`` is invertible
    and (``Sigma = diag(sigma)``)::

        R = Z Sigma^{-1/2},  L = Sigma^{-3/2} Z^T Y = R^{-1},  S = L^T L,  S^{-1} = R R^T

    and ``(left, right) = (L, R)`` is the paper's closed form (``A' A'^T = B'^T B' = Sigma``),
    ordered by descending ``sigma`` with the sign rule of :func:`balanced_metric`. Pairs that fail
    :func:`resolved_gate` get the identity (and ``ok``), as in :func:`balanced_metric`. The inputs must
    be finite. The caller decides with ``ok`` (a host sync), so this is for eager use; it is the
    eager hook's hot path, hence written with as few (tiny, launch-bound) ops as it can.
    """
    lam_a, sig2, Z, live = live_basis(X, Y, eps)
    ok = live[..., 0] if frame is None else _separated(lam_a, sig2, live)
    w = sig2.pow(-0.25).unsqueeze(-2)  # (not-ok pairs may get inf / NaN here: discarded)
    R = Z * w
    Lt = mm(Y, Z) * w.pow(3)  # L^T
    if frame is None:
        out: tuple[Tensor, ...] = (mm(Lt, Lt.mT), mm(R, R.mT))
    else:
        left, right = _canonical_signs(Lt.mT.flip(-2), R.flip(-1))
        out = (left, right, mm(Lt, Lt.mT), mm(R, R.mT)) if metric else (left, right)
    if resolved > 0:
        act = resolved_gate(sig2, resolved)
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
        out = tuple(torch.where(act[..., None, None], t, eye) for t in out)
        ok = ok | ~act
    return out, ok


def balanced_metric(
    X: Tensor, Y: Tensor, eps: float, frame: str = "paper", resolved: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""RefLoRA's refactoring from the Grams ``X = A A^T`` and ``Y = B^T B`` (float64, batched).

    Returns, for finite ``X`` and ``Y``, ``(left, right, S, S_inv, live)`` with ``A' = left @ A``,
    ``B' = B @ right``, ``right @ left = I``, ``S = left^T left`` and ``live`` the number of live
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
      diag(sigma)`` as in the paper's closed form, in descending order of ``sigma``. Made
      canonical: each column of ``right`` has its largest entry positive; where the basis is
      not well determined (a dead direction, or singular values closer than
      ``max(1e-4, 1e-6 c)`` of their mean, ``c`` bounding ``cond(S)``: see ``_separated``) a
      tiny fixed tie-breaker orders the (near-)repeated eigenspaces by coordinate, so eager,
      compiled, other devices and ranks agree to round-off. Elsewhere the basis is the exact
      one, which :func:`live_metric` computes with two eigendecompositions instead of four.
      Measured to train markedly better under AdamW than the symmetric frame.
    * ``"symmetric"``: ``P = S^{1/2}``, the one closest to the identity: unique with no
      convention needed, and an already balanced pair is left exactly as it is.

    ``resolved > 0``: a pair whose smallest singular value is below ``resolved`` times its
    largest gets the identity (see :func:`resolved_gate`); ``0`` is the paper.
    """
    cd = X.dtype
    eye = torch.eye(X.shape[-1], dtype=cd, device=X.device)
    # X and Y are finite here (full_kernel masks non-finite pairs), so plain eigh is safe
    lam_a, sig2, Z, live = live_basis(X, Y, eps)
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
        # Where that basis is not well determined (not _separated), a tie-breaker
        # delta * diag(r-1, ..., 0) fixes it inside (near-)repeated eigenspaces (the dead block
        # among them) to the one that orders the coordinates. Round-off in G is about
        # machine_eps * cond(S) of its mean eigenvalue, so delta = max(1e-7, 1e-8 cond(S)) of the
        # mean bounds every eigenvector's sensitivity to round-off by ~1e-8 (measured: batched and
        # per-pair calls agree to 3e-8, to 3e-5 on tiny pairs with dead directions) while rotating
        # a basis with eigenvalue gap g by only ~delta / g; then the sign rule.
        G = right.mT @ Y @ right
        r = G.shape[-1]
        rel = (1e-8 * s.amax(-1, keepdim=True) / s.amin(-1, keepdim=True)).clamp(1e-7, 1e-3)
        rel = torch.where(_separated(lam_a, sig2, live)[..., None], 0.0, rel)
        delta = rel * G.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
        ramp = torch.arange(r - 1, -1, -1, dtype=cd, device=G.device)
        # eigenvectors of -G come in descending order of G's eigenvalues, like the singular values
        _, V_g = sym_eigh(-(G + torch.diag_embed(delta * ramp)))
        left, right = _canonical_signs(V_g.mT @ left, right @ V_g)
    # no live direction (B = 0, A = 0): exactly the identity, not eigh's round-off of it; the
    # same for a pair that fails the resolution test
    any_live = live.any(-1)
    if resolved > 0:
        any_live = any_live & resolved_gate(sig2, resolved)
    any_live = any_live[..., None, None]
    left, right, S, S_inv = (torch.where(any_live, t, eye) for t in (left, right, S, S_inv))
    return left, right, S, S_inv, live.sum(-1)


# ------------------------------------------------------------------------------- block frame

#: ``frame="block"``: directions whose singular value is below this fraction of the largest are
#: floored there and share the blocks of the needed ones (docs/rank-deficient.md).
BLOCK_FLOOR = 0.1


@functools.lru_cache(maxsize=None)
def _block_table(r: int) -> Tensor:
    """``(r, r, r)`` float64: entry ``k - 1`` is the block frame ``F`` for ``k`` needed directions.

    Column ``j < k`` is ``1 / sqrt(n_j)`` on block ``j`` (contiguous coordinates, ``n_j = r // k``
    or one more); the other columns are the higher orthonormal DCT-II columns of each block, in
    turn. ``k = r`` is the identity (the paper frame)."""
    out = torch.zeros(r, r, r, dtype=torch.float64)
    for k in range(1, r + 1):
        start, extra = 0, k
        for j in range(k):
            n = r // k + (1 if j < r % k else 0)
            i = torch.arange(n, dtype=torch.float64)
            C = torch.cos(math.pi * (i[:, None] + 0.5) * i[None, :] / n) * math.sqrt(2.0 / n)
            out[k - 1, start:start + n, j] = 1.0 / math.sqrt(n)
            out[k - 1, start:start + n, extra:extra + n - 1] = C[:, 1:]
            extra += n - 1
            start += n
    return out


def block_metric(X: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The block frame (``frame="block"``): ``(left, right, S, S_inv, live)`` like :func:`balanced_metric`.

    In the basis ``Z`` of :func:`live_basis` (``Z^{-1} X Z^{-T} = I``, ``Z^T Y Z = diag(sigma^2)``,
    ``sigma`` descending), direction ``j`` of ``A`` is scaled to length ``d_j`` and of ``B`` to
    ``sigma_j / d_j``, with ``d_j^2 = max(sigma_j, 0.1 sigma_1)``: the needed directions
    (``sigma_j >= 0.1 sigma_1``, ``k`` of them) are balanced, the others floored, never collapsed.
    Then ``left = F diag(d s) Z^{-1}``, ``right = Z diag(s / d) F^T`` with ``F`` the block frame of
    ``k`` (:func:`_block_table`): each needed direction is spread evenly over its own block of about
    ``r / k`` coordinates, the others fill the blocks' remaining (DCT) columns. ``s_j = \pm 1`` aligns
    ``Z``'s columns with ``F``'s. ``k = r`` is the paper frame. A pair with no live direction, or
    with a rank-deficient ``A``, gets the identity. Traceable: ``F`` is gathered by ``k`` from a
    constant table.
    """
    cd = X.dtype
    r = X.shape[-1]
    eye = torch.eye(r, dtype=cd, device=X.device)
    lam_a, sig2, Z, live = live_basis(X, Y, eps)
    sig2, Z, live = sig2.flip(-1), Z.flip(-1), live.flip(-1)  # descending sigma
    sig = sig2.sqrt()
    top = BLOCK_FLOOR * sig[..., :1]
    d2 = torch.maximum(torch.where(live, sig, 0.0), top)
    k = (live & (sig >= top)).sum(-1).clamp_min(1)
    F = _block_table(r).to(dtype=cd, device=X.device)[k - 1]
    full_rank = lam_a[..., 0] > 1e-12 * lam_a[..., -1]
    Zs = torch.where(full_rank[..., None, None], Z, eye)
    Zi = torch.linalg.solve(Zs, eye.expand_as(Zs))
    sgn = torch.where((F * Zs).sum(-2) >= 0, 1.0, -1.0).to(cd)
    d = d2.clamp_min(torch.finfo(cd).tiny).sqrt()
    left = F @ ((d * sgn).unsqueeze(-1) * Zi)
    right = (Zs * (sgn / d).unsqueeze(-2)) @ F.mT
    S, S_inv = left.mT @ left, right @ right.mT
    act = (live.any(-1) & full_rank)[..., None, None]
    left, right, S, S_inv = (torch.where(act, t, eye) for t in (left, right, S, S_inv))
    return left, right, S, S_inv, live.sum(-1)


# ----------------------------------------------------------------------------- eigh-free solver

# Relative diagonal shift of the normalised Grams (a fraction of their mean eigenvalue). It
# bounds the spectra the iteration has to converge on, so a fixed step count suffices for every
# input, dead directions included; it perturbs a live eigenvalue x_i by NS_SHIFT * mean(x), i.e.
# S by at most about NS_SHIFT * (cond(A)^2 + cond(B)^2) relative (1e-6 at cond(A) = cond(B) = 1e3).
NS_SHIFT = 1e-12

# The fast phase: an odd quintic z (a + b z^2 + c z^4) with slope a = 3.4445 at 0 (Jordan et
# al.'s Muon coefficients): small eigenvalues of z grow 3.44x per step (vs 1.5x for the cubic),
# and it maps (0, 1] into (0, 1.21) and [0.3, 1.21] into [0.68, 1.14] (checked numerically), so
# nothing leaves the cubic's basin (0, sqrt 3). It does not converge to 1 by itself: the cubic
# Newton-Schulz step z (3 - z^2) / 2 finishes, taking [0.68, 1.14] to 1 within 1e-16 in six
# steps (seven used: one for the round-off of the matrix products).
_NS_FAST = (3.4445, -4.7750, 2.0315)
_NS_FINAL_STEPS = 7


def _ns_fast_steps(z_min: float) -> int:
    """Quintic steps after which every ``z`` in ``[z_min, 1]`` lies in ``[0.68, 1.14]``."""
    a, b, c = _NS_FAST
    z, k = z_min, 0
    while z < 0.3:
        z, k = a * z + b * z**3 + c * z**5, k + 1
    return k + 2  # two more steps take [0.3, 1.21] into the attractor [0.68, 1.14]


def _coupled_sign(P: Tensor, Q: Tensor, fast_steps: int) -> tuple[Tensor, Tensor]:
    r"""Off-diagonal blocks of ``sign([[0, P], [Q, 0]])`` by a fixed polynomial iteration.

    ``Z = [[0, P], [Q, 0]]`` stays block off-diagonal under any odd polynomial ``Z g(Z^2)``
    (``Z^2 = diag(PQ, QP)``), so only the two ``r x r`` blocks are iterated::

        M = Q P,  G = g(M),  P <- P G,  Q <- G Q

    with ``g(M) = a + b M + c M^2`` (``fast_steps`` times) then ``g(M) = (3 - M) / 2``. The
    eigenvalues of ``QP`` must lie in ``(0, 1]`` and be at least ``z_min^2`` (``fast_steps`` from
    ``_ns_fast_steps``). ``P``, ``Q`` symmetric stay symmetric (``P g(QP)`` is a polynomial
    in ``P Q P ...``); they are re-symmetrised each step so round-off cannot drift.
    """
    a, b, c = _NS_FAST
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    for step in range(fast_steps + _NS_FINAL_STEPS):
        M = Q @ P
        if step < fast_steps:
            G = a * eye + M @ (b * eye + c * M)
        else:
            G = 1.5 * eye - 0.5 * M
        P, Q = P @ G, G @ Q
        P, Q = 0.5 * (P + P.mT), 0.5 * (Q + Q.mT)
    return P, Q


def newton_schulz_metric(X: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""RefLoRA's metric and its symmetric-frame refactor by matrix multiplications only.

    Returns ``(left, right, S, S_inv) = (S^{1/2}, S^{-1/2}, S, S^{-1})`` from the float64 Grams
    ``X = A A^T`` and ``Y = B^T B`` (batched), with ``S = X^{-1} # Y`` the SPD solution of
    ``S X S = Y``: :func:`newton_schulz_geomean` then :func:`newton_schulz_sqrt`. No
    ``eigh``/``svd``/``solve``, a fixed number of steps set by ``r``, no branch on values.
    """
    S, S_inv, any_live = newton_schulz_geomean(X, Y, eps)
    left, right = newton_schulz_sqrt(S)
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    # no product at all (B = 0, A = 0): exactly the identity, like the eigh kernel
    left, right = (torch.where(any_live, m, eye) for m in (left, right))
    return left, right, S, S_inv


def newton_schulz_geomean(X: Tensor, Y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(S, S^{-1}, any_live)``: the geometric mean ``S = X^{-1} # Y`` by a coupled Newton-Schulz sign iteration.

    .. code-block:: text

        X^ = X / tr X + d I / r,  Y^ = Y / tr Y + d I / r        (d = NS_SHIFT = 1e-12)
        c^2 = tr(X^ Y^)  >= rho(X^ Y^)                           (eigenvalues of Z^2 in (0, 1])
        sign([[0, Y^], [X^, 0]] / c) = [[0, S^], [S^^{-1}, 0]]   (S^ = Y^ (X^ Y^)^{-1/2} = X^^{-1} # Y^)
        S = sqrt(tr Y / tr X) S^,   S^{-1} = sqrt(tr X / tr Y) S^^{-1}

    ``sign(Z) = Z (Z^2)^{-1/2}`` with ``Z^2 = diag(Y^ X^, X^ Y^)``; ``_coupled_sign`` iterates
    its two blocks (``P -> S^``, ``Q -> S^^{-1}``). Dividing both by the same ``c`` keeps the
    limit (``sign(Z / c) = sign(Z)``); normalising by the traces first uses the homogeneity
    ``(a X)^{-1} # (b Y) = sqrt(b / a) X^{-1} # Y`` so that the iteration sees unit-trace Grams
    whatever the scale and imbalance of the factors. The shift bounds the eigenvalues of
    ``Z^2 / c^2`` below by ``(d / r)^2 / (1 + d)^2``, so the step count that converges that bound
    (set from ``r`` alone) converges every input.

    Dead directions: the iteration cannot see the spectrum; the shift ``d`` (a fraction 1e-12 of
    each normalised Gram's mean eigenvalue) makes every pair well posed instead:

    * a direction dead in both factors gets the scalar balance ``sqrt(tr Y / tr X)``
      (RefLoRA-S's ``p^2``) where the eigh kernel gives 1;
    * a direction dead in one factor only (``r > min(m, n)``, or an exactly rank-deficient
      factor) gets a metric up to ``d^{-1/2} = 1e6`` times larger or smaller than that, where
      eigh gives 1: finite, ``S S^{-1} = I`` and the product kept, but the other factor's step
      along that direction is damped by up to ``1e-6``;
    * a pair with no product at all, ``tr(X Y) = ||B A||_F^2 <= eps tr X tr Y`` (``B = 0``,
      ``A = 0``), gets exactly the identity, as with eigh (``any_live`` is False).

    On live directions the shift changes ``S`` by at most about ``d (cond(A)^2 + cond(B)^2)``
    relative (docs/theory.md, "Eigh-free solver").
    """
    r = X.shape[-1]
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    tx = X.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    ty = Y.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    txy = (X * Y).sum((-2, -1))[..., None, None]  # tr(XY) = ||B A||_F^2 (both symmetric)
    any_live = txy > eps * tx * ty
    tx = torch.where(any_live, tx, 1.0)
    ty = torch.where(any_live, ty, 1.0)
    shift = (NS_SHIFT / r) * eye
    Xn = X / tx + shift
    Yn = Y / ty + shift
    c = (Xn * Yn).sum((-2, -1))[..., None, None].sqrt()
    P, Q = _coupled_sign(Yn / c, Xn / c, _ns_fast_steps(NS_SHIFT / r / (1.0 + NS_SHIFT)))
    ratio = (ty / tx).sqrt()
    S, S_inv = (torch.where(any_live, m, eye) for m in (P * ratio, Q / ratio))
    return S, S_inv, any_live


def newton_schulz_sqrt(S: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(S^{1/2}, S^{-1/2})`` of an SPD ``S`` from :func:`newton_schulz_geomean` (coupled Newton-Schulz).

    .. code-block:: text

        sign([[0, S / t], [I, 0]]) = [[0, (S / t)^{1/2}], [(S / t)^{-1/2}, 0]],   t = tr S

    (the Newton-Schulz form of Denman-Beavers), rescaled by ``sqrt(t)``. ``t >= rho(S)`` puts
    the spectrum in ``(0, 1]``; the geometric mean of shifted Grams has ``cond(S) <= r / d``, so
    the eigenvalues of ``S / t`` are at least ``d / r^2`` and the step count is again set by ``r``.
    """
    r = S.shape[-1]
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    t = S.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    # half the bound as margin: S is itself an iterate, and cond(S) <= r / d holds up to 1 + d / r
    R, R_inv = _coupled_sign(S / t, eye.expand_as(S), _ns_fast_steps((NS_SHIFT / r**2) ** 0.5 / 2))
    return R * t.sqrt(), R_inv / t.sqrt()


_live_basis = live_basis  # (the name tests/core/test_numerics.py imports)
