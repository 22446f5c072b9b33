"""Small symmetric eigen-routines shared by the functional core.

Everything here works on batches of small ``(r, r)`` matrices, is pure and traceable
(no ``.item()``, no Python branches on values), and runs in a *compute dtype* that is
float64 for float64 inputs and float32 for everything else: ``torch.linalg.eigh`` has no
half-precision kernels, and the Gram matrices square the condition number of the factors.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "default_eps", "floored_eigh", "safe_eigh"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """Relative eigenvalue floor used when the caller passes ``eps=None``.

    The eigenvalues of a Gram matrix ``G`` computed in floating point carry an absolute error
    of a few ``machine_eps * lambda_max(G)`` (growing with the rank), so anything below
    ``64 * machine_eps * lambda_max`` is noise: 7.6e-6 in float32, 1.4e-14 in float64.
    """
    return 64.0 * torch.finfo(compute_dtype(dtype)).eps


def safe_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a batch of symmetric PSD matrices that never raises on bad values.

    LAPACK may report a convergence failure (and torch then raises) for a matrix holding
    NaN or Inf. Such matrices are replaced by the identity before the call; the caller is
    responsible for masking the corresponding outputs (see ``functional._finite_mask``).
    Eigenvalues come back clamped at zero: round-off can make them slightly negative, and
    their square roots would be NaN.
    """
    ok = torch.isfinite(gram).flatten(-2).all(-1)[..., None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = torch.where(ok, gram, eye)
    # Symmetrise: eigh reads one triangle only, and A @ A.T is symmetric only up to round-off.
    gram = 0.5 * (gram + gram.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(gram)
    return evals.clamp_min(0.0), evecs


def floored_eigh(
    gram: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decompose PSD Grams and floor their spectrum.

    Returns ``(evals, floored, evecs)``: the clamped eigenvalues, the eigenvalues floored at
    ``max(eps * lambda_max, tiny)`` (so their inverse square roots are finite), and the
    eigenvectors. ``eps`` is relative to the largest eigenvalue of each matrix, so the floor
    is scale-free: multiplying a factor by 1e4 does not change which directions are floored.
    """
    evals, evecs = safe_eigh(gram)
    tiny = torch.finfo(gram.dtype).tiny
    floor = (eps * evals.amax(-1, keepdim=True)).clamp_min(tiny)
    return evals, torch.maximum(evals, floor), evecs
