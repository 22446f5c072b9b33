"""Screening study for issue 31: refactoring modes that win when the adapter's rank exceeds the task's.

Every candidate is written here as a float64 step pre-hook on one LoRA pair (``A (r x 64)``,
``B (64 x r)``), like ``rank_deficient_candidates.py``: the hook computes a refactoring
``A' = left A``, ``B' = B right`` (``right = left^{-1}``, so ``B' A' = B A``; in the notation
of docs/method.md ``left = P^T``, ``right = P^{-T}``, ``S = P P^T = left^T left``) and

* under AdamW (parameter space): replaces ``(A, B)``, maps the gradients
  (``grad_A <- right^T grad_A``, ``grad_B <- grad_B left^T``), the first moments exactly
  (``m_A <- right^T m_A``, ``m_B <- m_B left^T``) and the second moments by a rule (``v2=``:
  ``square``, the element-wise squares of the same maps, as the library does; ``floor``,
  ``max(square, m'^2)`` so that Adam's normalised step stays <= 1 per coordinate; ``keep``);
* under SGD with momentum (gradient space, the library's SGD default): keeps ``(A, B)`` and maps
  ``grad_A <- S^{-1} grad_A``, ``grad_B <- grad_B S``.

Candidates (``--methods``; names in ``CANDIDATES`` or ad hoc ``kind:key=val,...``), in the
basis ``Z`` with ``Z^{-1} X Z^{-T} = I`` and ``Z^T Y Z = diag(sigma^2)`` (``X = A A^T``,
``Y = B^T B``, ``sigma`` the singular values of ``B A``, descending):

* ``kind=zd``: direction ``j`` of ``A`` gets the norm ``d_j`` (``left = F diag(d) Z^{-1}``,
  ``F`` orthogonal: the frame), ``S = Z^{-T} diag(d^2) Z^{-1}``; ``d_j^2 = sigma_j`` is the
  paper's balanced pair; ``floor=c`` uses ``d_j^2 = max(sigma_j, c tr(X) / r)`` (never shrink a
  direction of ``A`` below ``c`` of ``A``'s mean scale), ``top=c`` uses
  ``max(sigma_j, c sigma_max)``.
* ``kind=proj``: balance the directions with ``sigma_j >= c sigma_max`` and keep the identity
  metric on the rest (the library's projector construction ``S = L^T L + (I-Pi)^T (I-Pi)`` with a
  larger live threshold).
* ``kind=damp``: the damped geometric mean, ``S`` the SPD solution of
  ``S (X + lam I) S = Y + lam I``; ``lam = c sigma_max`` (``lam=smax``), ``c (tr X + tr Y) / 2r``
  (``gram``), or ``c sqrt(loss)`` scaled to Gram units (``loss``).
* ``kind=blend``: ``S^alpha`` of the paper's ``S`` with ``alpha = rho^p / (rho^p + rho0^p)``,
  ``rho = sigma_min / sigma_max``.

Frames (``frame=``): ``block`` (the study's lead, ``bf0.1``: with ``k^ = #{sigma_j >= kc
sigma_max}``, live direction ``j < k^`` spread evenly (a constant DCT column) over its own block of
about ``r / k^`` coordinates, the ``r - k^`` other directions on the blocks' remaining DCT columns;
``k^ = r`` is the paper frame; each direction's sign chosen so that an already refactored pair maps
to itself), ``paper`` (``F = I``: direction ``j`` on coordinate ``j``), ``near`` (the
pair nearest the current one, ``min ||A' - A||^2 + ||B' - B||^2`` over ``F``, a polar factor),
``sym`` (``left = S^{1/2}``), ``fblend`` (the polar factor of ``(1-w) M + w ||M||/sqrt(r) I``
where ``M`` is the nearest-frame objective relative to the paper frame, ``w = rho^p /
(rho^p + rho0^p)``: the nearest frame when the spectrum is unresolved, the paper frame when it
is). Options for every kind: ``gate=g`` (act only where ``sigma_min >= g sigma_max``),
``warm=n`` (skip the first ``n`` optimizer steps), ``form=g`` (act only once the top direction is
carried by both factors, ``sigma_max >= g max(|A|_2^2, |B|_2^2)``).

Files (``benchmarks/studies/rank/modes/``): ``s1-first``, ``s2-first``, ``s3-first`` (the first screens of
every candidate family), ``s1-bf`` (block-frame variants, run before the sign rule: their rows
are ``bf0.1-noalign`` and the like), ``s1-bff``, ``s2-bff``, ``s3-bf-adamw`` (AdamW half of
S3), ``s1-final`` (``bf0.1`` with the sign rule, the default and the paper form), ``mf``,
``grid-adamw-bf0.1`` (the AdamW half of the 270-cell grid, 180 cells x 5 seeds; its ``.txt`` is
the table by regime), ``s1-gap`` (gap-based estimates of ``k^``), ``trace-r16k4`` (one run traced
step by step); each other ``.txt`` is the printed report of its ``.json``. The JSONs of the first
screens (``s1-first``, ``s2-first``, ``s3-first``, ``s1-bf``, ``s1-gap``: 1.6 MB) are not committed,
their reports are.

Screens (``--screen``):

* ``S1``: AdamW, full batch, B = 0 start (``rank_deficient.problem``): r in {8, 16, 32}, the
  distinct k in {1, r/4, r/2, r}, lr in {1e-3, 3e-3, 1e-2}: 36 cells.
* ``S2``: SGD momentum 0.9, lr {3e-3, 1e-2, 3e-2}, full batch, r in {8, 16}, every k.
* ``S3``: other starts (``problem_start``): ``resumed`` (A 10x, B small, B A half of the
  target's projection), PEFT's ``gaussian`` / ``pissa`` / ``olora`` (a frozen random base ``W0``,
  the target ``W0 + dW``), and ``spread`` (a full-rank target with singular values
  log-spaced 1..30) from the B = 0 and resumed starts; AdamW and SGD momentum; compared with
  plain LoRA and the paper's form (``paper``: ``reflora.attach(..., resolved=0.0)``).
* ``mf``: the paper's matrix-factorisation toy (``reflora.bench.mf``), plain GD at 0.01 / 0.03.
* ``grid``: rank_deficient.py's whole 270-cell grid (5 seeds).

Baselines: ``lora``; ``default`` (``reflora.attach`` with its defaults: the gate and warmup 3);
``paper`` (``resolved=0.0``, the paper's form in the library's default space: parameter under
AdamW, gradient under SGD).

Run from ``benchmarks/studies/``: ``python rank_modes.py --screen S1 --methods near fb-floor --json
rank/modes/s1.json``; ``--from-json F`` prints a saved screen again. Losses are the median over
seeds at steps 50 / 150 / 300, floored at 1e-8 of the initial loss; ratios to plain LoRA on the
same seeds (S3 also to the paper's form and to the better of the two).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rank_deficient import M, N_OUT, ROWS, STEPS, floored, grid, problem  # noqa: E402

import reflora  # noqa: E402

EPS_LIB = 64.0 * torch.finfo(torch.float64).eps
TOL = 1.2

# ----------------------------------------------------------------------------- candidates

CANDIDATES: dict[str, str] = {
    # reference copies (checks of this script)
    "bal": "zd:frame=paper",
    # the nearest balanced frame
    "near": "zd:frame=near",
    "near+gate": "zd:frame=near,gate=0.1,warm=3",
    "near+warm": "zd:frame=near,warm=3",
    # the previous study's lead
    "floor+near": "zd:floor=0.1,frame=near",
    # balance only the resolved subspace
    "res0.1+near": "proj:c=0.1,frame=near",
    "res0.1+sym": "proj:c=0.1,frame=sym",
    "res0.3+near": "proj:c=0.3,frame=near",
    # the damped geometric mean
    "damp-smax1+near": "damp:lam=smax,c=1,frame=near",
    "damp-smax0.1+near": "damp:lam=smax,c=0.1,frame=near",
    "damp-smax1+paper": "damp:lam=smax,c=1,frame=paper",
    "damp-smax1+sym": "damp:lam=smax,c=1,frame=sym",
    "damp-gram1+near": "damp:lam=gram,c=1,frame=near",
    # the continuous blend of the metric
    "blend+near": "blend:rho0=0.1,p=4,frame=near",
    "blend+sym": "blend:rho0=0.1,p=4,frame=sym",
    # frame blend (paper frame where resolved, nearest where not)
    "bal+fblend": "zd:frame=fblend,rho0=0.1,p=4",
    "floor+fblend": "zd:floor=0.1,frame=fblend,rho0=0.1,p=4",
    # block frame: live directions (sigma_j >= c sigma_max) balanced, each spread evenly over its
    # own block of ~r / k coordinates; the others floored at c sigma_max and put in the blocks
    "bf0.1": "zd:top=0.1,frame=block,kc=0.1",
    "bf0.1-noalign": "zd:top=0.1,frame=block,kc=0.1,align=0",  # rank/modes/s1-bf.json's bf* rows ran without the sign rule
    "bf0.05": "zd:top=0.05,frame=block,kc=0.05",
    "bf0.03": "zd:top=0.03,frame=block,kc=0.03",
    "bf0.01": "zd:top=0.01,frame=block,kc=0.01",
    "bf0.1w3": "zd:top=0.1,frame=block,kc=0.1,warm=3",
    # k-hat from the largest gap (ratio >= G between neighbouring singular values, below 0.1 sigma_max)
    "bfg10": "zd:top=0.1,frame=block,kgap=10",
    "bfg10w3": "zd:top=0.1,frame=block,kgap=10,warm=3",
    "bfg30w3": "zd:top=0.1,frame=block,kgap=30,warm=3",
    "bf0.03w3": "zd:top=0.03,frame=block,kc=0.03,warm=3",
    # the same, acting only once the top direction is formed (sigma_max >= 0.3 max(|A|_2^2, |B|_2^2))
    "bff": "zd:top=0.1,frame=block,kc=0.1,form=0.3",
}
BASELINES = {"lora": None, "default": {}, "paper": {"resolved": 0.0}}


def parse(name: str) -> dict:
    spec = CANDIDATES.get(name, name)
    kind, _, rest = spec.partition(":")
    out: dict = {"kind": kind, "frame": "near", "v2": "square", "gate": 0.0, "warm": 0, "rho0": 0.1, "p": 4.0}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        out[k] = v if k in ("frame", "v2", "lam") else float(v)
    return out


def _basis(X: torch.Tensor, Y: torch.Tensor):
    lam, Va = torch.linalg.eigh(X)
    lam = lam.clamp_min(1e-300)
    Z0, Z0i = Va * lam.sqrt(), (Va / lam.sqrt()).T
    sig2, Vm = torch.linalg.eigh(Z0.T @ Y @ Z0)
    Z, Zi = (Z0 @ Vm).flip(1), (Vm.T @ Z0i).flip(0)  # descending sigma
    return Z, Zi, sig2.clamp_min(0).sqrt().flip(0)


def _wfun(rho: float, o: dict) -> float:
    x, y = rho ** o["p"], o["rho0"] ** o["p"]
    return x / (x + y) if x + y > 0 else 0.0


def _sqrtm(S: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    s, V = torch.linalg.eigh(0.5 * (S + S.T))
    return (V * s.clamp_min(1e-300).pow(power)) @ V.T


def _dct(n: int, dtype) -> torch.Tensor:
    """Orthonormal DCT-II basis as columns (column 0 constant)."""
    i = torch.arange(n, dtype=dtype)
    C = torch.cos(math.pi * (i[:, None] + 0.5) * i[None, :] / n) * math.sqrt(2.0 / n)
    C[:, 0] = 1.0 / math.sqrt(n)
    return C


def block_frame(r: int, k: int, dtype) -> torch.Tensor:
    """Orthogonal F (r x r): column j < k (live direction j) spread evenly over its own block of
    about r / k coordinates; the r - k dead directions fill the blocks' other DCT columns."""
    sizes = [r // k + (1 if j < r % k else 0) for j in range(k)]
    F = torch.zeros(r, r, dtype=dtype)
    start, dead = 0, k
    for j, n in enumerate(sizes):
        C = _dct(n, dtype)
        F[start:start + n, j] = C[:, 0]
        for c in range(1, n):
            F[start:start + n, dead] = C[:, c]
            dead += 1
        start += n
    return F


def _polar(Mx: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q maximising tr(Q Mx)."""
    U, _, Vh = torch.linalg.svd(Mx)
    return (U @ Vh).T


def transform(o: dict, A: torch.Tensor, B: torch.Tensor, t: int, loss: float):
    """``(left, right)`` of candidate ``o`` at optimizer step ``t`` (1-based), or None (identity)."""
    if t <= o["warm"]:
        return None
    A, B = A.double(), B.double()
    X, Y = A @ A.T, B.T @ B
    r = X.shape[0]
    eye = torch.eye(r, dtype=X.dtype)
    Z, Zi, sig = _basis(X, Y)
    smax = sig[0]
    live = sig.square() > EPS_LIB * torch.linalg.eigvalsh(X)[-1] * Y.trace()
    if not bool(live.any()) or smax <= 0:
        return None  # B = 0: plain step (the library's dead-direction rule)
    rho = float(sig[-1] / smax)
    if o["gate"] > 0 and rho < o["gate"]:
        return None
    if o.get("form", 0.0) > 0:
        # "formed": the top direction of B A is carried by both factors, sigma_max >= form *
        # max(|A|_2^2, |B|_2^2) (1 for a balanced pair, 0 at B = 0); balancing makes it 1, so
        # once open it stays open
        scale = torch.maximum(torch.linalg.eigvalsh(X)[-1], torch.linalg.eigvalsh(Y)[-1])
        if smax < o["form"] * scale:
            return None
    kind, frame = o["kind"], o["frame"]
    left_p = None  # a "paper-like" left (directions on coordinates), if the kind has one
    khat_gap = None
    if "kgap" in o:
        # k-hat from the largest gap in the live spectrum: the directions above a ratio of at
        # least kgap between neighbours (and below top * smax) are the needed ones; no such gap: all live
        n_live = int(live.sum())
        ls = sig[:n_live].clamp_min(1e-300).log()
        khat_gap = n_live
        if n_live > 1:
            gaps = ls[:-1] - ls[1:]
            j = int(gaps.argmax())
            if float(gaps[j]) >= math.log(o["kgap"]) and float(sig[j + 1]) < o.get("top", 0.1) * float(smax):
                khat_gap = j + 1
    if kind == "zd":
        d2 = torch.where(live, sig, 0.0)
        if "floor" in o:
            d2 = torch.maximum(d2, o["floor"] * X.trace() / r)
        if "top" in o and khat_gap is not None:
            idx = torch.arange(r)
            d2 = torch.where(idx < khat_gap, d2, torch.maximum(d2, o["top"] * smax))
        elif "top" in o:
            d2 = torch.maximum(d2, o["top"] * smax)
        d2 = torch.where(d2 > 0, d2, X.trace() / r)
        d = d2.sqrt()
        left_p = d[:, None] * Zi
        S = left_p.T @ left_p
    elif kind == "proj":
        J = live & (sig >= o["c"] * smax)
        ZJ, sJ = Z[:, J], sig[J]
        L = (sJ.pow(-1.5)[:, None]) * (ZJ.T @ Y)
        R = ZJ * sJ.rsqrt()
        C = eye - R @ L
        S = L.T @ L + C.T @ C
    elif kind == "damp":
        if o["lam"] == "smax":
            lam = o["c"] * smax
        elif o["lam"] == "gram":
            lam = o["c"] * (X.trace() + Y.trace()) / (2 * r)
        elif o["lam"] == "loss":  # sqrt(loss) relative to the initial loss, in units of sigma_max
            lam = o["c"] * smax * math.sqrt(max(loss, 0.0))
        else:
            raise ValueError(o["lam"])
        Zl, Zli, mu = _basis(X + lam * eye, Y + lam * eye)
        left_p = mu.sqrt()[:, None] * Zli
        S = left_p.T @ left_p
    elif kind == "blend":
        Jl = live
        ZJ, sJ = Z[:, Jl], sig[Jl]
        L = (sJ.pow(-1.5)[:, None]) * (ZJ.T @ Y)
        R = ZJ * sJ.rsqrt()
        C = eye - R @ L
        S1 = L.T @ L + C.T @ C
        S = _sqrtm(S1, _wfun(rho, o))
    else:
        raise ValueError(kind)
    if frame == "paper":
        if left_p is None:
            raise ValueError(f"kind {kind} has no paper frame")
        left = left_p
    elif frame == "sym":
        left = _sqrtm(S)
    elif frame == "block":
        if left_p is None:
            raise ValueError(f"kind {kind} has no paper frame to build blocks on")
        khat = khat_gap if khat_gap is not None else int((live & (sig >= o.get("kc", 0.1) * smax)).sum())
        F = block_frame(r, max(khat, 1), X.dtype)
        if o.get("align", 1.0) > 0:
            # eigh's signs are arbitrary; in a block frame a flipped direction mixes the coordinates
            # of its block, so pick each direction's sign to align Z with the frame's column
            # (an already refactored pair then maps to itself)
            sgn = torch.where((F * Z).sum(0) >= 0, 1.0, -1.0).to(X.dtype)
            left_p = sgn[:, None] * left_p
        left = F @ left_p
    elif frame in ("near", "fblend"):
        left0 = left_p if left_p is not None else _sqrtm(S)
        right0 = torch.linalg.inv(left0)
        Mx = left0 @ X + right0.T @ Y
        if frame == "fblend":
            if left_p is None:
                raise ValueError(f"kind {kind} has no paper frame to blend with")
            w = _wfun(rho, o)
            Mx = (1 - w) * Mx + w * Mx.norm() / math.sqrt(r) * eye
        left = _polar(Mx) @ left0
    else:
        raise ValueError(frame)
    right = torch.linalg.inv(left)
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
        return None
    return left, right


def attach_candidate(opt: torch.optim.Optimizer, A: nn.Parameter, B: nn.Parameter, name: str, ctx: dict) -> None:
    o = parse(name)
    sgd = isinstance(opt, torch.optim.SGD)
    state = {"t": 0}

    def pre(optim, args, kwargs):
        state["t"] += 1
        with torch.no_grad():
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                return
            try:
                T = transform(o, A, B, state["t"], ctx.get("loss_rel", 1.0))
            except (torch.linalg.LinAlgError, RuntimeError):
                return
            if T is None:
                return
            L, R = T
            if sgd:  # gradient space
                S, Si = L.T @ L, R @ R.T
                A.grad.copy_(Si @ A.grad.double())
                B.grad.copy_(B.grad.double() @ S)
                return
            A.copy_(L @ A.double())
            B.copy_(B.double() @ R)
            A.grad.copy_(R.T @ A.grad.double())
            B.grad.copy_(B.grad.double() @ L.T)
            st_a, st_b = optim.state[A], optim.state[B]
            if "exp_avg" in st_a:
                ma = R.T @ st_a["exp_avg"].double()
                mb = st_b["exp_avg"].double() @ L.T
                st_a["exp_avg"].copy_(ma)
                st_b["exp_avg"].copy_(mb)
                if o["v2"] != "keep":
                    va = R.T.square() @ st_a["exp_avg_sq"].double()
                    vb = st_b["exp_avg_sq"].double() @ L.T.square()
                    if o["v2"] == "floor":
                        b1, b2 = optim.param_groups[0]["betas"]
                        n = int(st_a["step"])
                        # m_hat^2 <= v_hat  <=>  v >= m^2 (1 - b2^n) / (1 - b1^n)^2
                        f = (1 - b2**n) / (1 - b1**n) ** 2
                        va, vb = torch.maximum(va, f * ma.square()), torch.maximum(vb, f * mb.square())
                    st_a["exp_avg_sq"].copy_(va)
                    st_b["exp_avg_sq"].copy_(vb)

    opt.register_step_pre_hook(pre)


# ----------------------------------------------------------------------------- problems

def problem_start(seed: int, r: int, k: int, start: str):
    """``(X, Y, A, B, g, W_res)``: ``rank_deficient.problem`` with another start / target.

    The model is ``X (W_res + A^T B^T)`` (``W_res`` frozen, ``None`` for no base). Starts:
    ``zero`` (PEFT default, the grid's), ``resumed`` (A 10x kaiming, B = 0.1 x the least-squares
    B giving half of the target through A: a partial fit, 100x unbalanced Grams), ``gaussian``
    (A ~ N(0, 1/r^2) as PEFT, B = 0), ``pissa`` / ``olora`` (a random pretrained W0 (M x N), target
    ``W0 + dW``; PiSSA: ``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r)`` from the SVD of ``W0^T``,
    OLoRA: ``B = Q[:, :r]``, ``A = R[:r]`` from the QR of ``W0^T``; the residual kept frozen),
    ``spread`` / ``spread-resumed`` (a full-rank target (k = r) with singular values log-spaced
    1..30, scaled by 1/sqrt(M), from the zero / resumed start).
    """
    if start == "zero":
        X, Y, A, B, g = problem(seed, r, k)
        return X, Y, A, B, g, None
    g = torch.Generator().manual_seed(seed)
    if start.startswith("spread"):
        U, _ = torch.linalg.qr(torch.randn(M, k, generator=g))
        V, _ = torch.linalg.qr(torch.randn(N_OUT, k, generator=g))
        s = torch.logspace(0, math.log10(30), k).flip(0) / math.sqrt(M) * 2
        W = (U * s) @ V.T
    else:
        W = torch.randn(M, k, generator=g) @ torch.randn(k, N_OUT, generator=g) / math.sqrt(M)
    X = torch.randn(ROWS, M, generator=g)
    A0 = (torch.rand(r, M, generator=g) - 0.5) * 2 / math.sqrt(M)
    W_res = None
    if start in ("zero", "spread"):
        A, B = A0, torch.zeros(N_OUT, r)
        Yt = X @ W
    elif start in ("resumed", "spread-resumed"):
        # B0 A0 = 0.5 W^T restricted to A0's row space; then A x10, B / 10
        B0 = 0.5 * W.T @ torch.linalg.pinv(A0)
        A, B = 10 * A0, B0 / 10
        Yt = X @ W
    elif start == "gaussian":
        A, B = torch.randn(r, M, generator=g) / r, torch.zeros(N_OUT, r)
        Yt = X @ W
    elif start in ("pissa", "olora"):
        W0 = torch.randn(M, N_OUT, generator=g) / math.sqrt(M)
        Yt = X @ (W0 + W)
        if start == "pissa":
            U, S, Vh = torch.linalg.svd(W0.T)  # (N x M) = B A layout
            B, A = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
        else:
            Q, R = torch.linalg.qr(W0.T)
            B, A = Q[:, :r].contiguous(), R[:r].contiguous()
        W_res = W0 - (B @ A).T
    else:
        raise ValueError(start)
    return X, Yt, nn.Parameter(A.clone()), nn.Parameter(B.clone()), g, W_res


def make_opt(opt_name: str, lr: float, A, B):
    if opt_name == "sgd-m":
        return torch.optim.SGD([A, B], lr=lr, momentum=0.9)
    if opt_name == "sgd":
        return torch.optim.SGD([A, B], lr=lr)
    return torch.optim.AdamW([A, B], lr=lr, weight_decay=0.01 if opt_name == "adamw-wd" else 0.0)


def run(method: str, opt_name: str, lr: float, r: int, k: int, seed: int, batch: int, start: str = "zero") -> dict:
    torch.set_num_threads(1)
    X, Y, A, B, g, W_res = problem_start(seed, r, k, start)
    opt = make_opt(opt_name, lr, A, B)
    ctx: dict = {}
    if method in BASELINES:
        if BASELINES[method] is not None:
            reflora.attach(opt, [(A, B)], **BASELINES[method])
    else:
        attach_candidate(opt, A, B, method, ctx)
    base = torch.zeros(ROWS, N_OUT) if W_res is None else X @ W_res

    def full_loss() -> float:
        with torch.no_grad():
            return float(((base + X @ A.T @ B.T - Y) ** 2).mean())

    l0 = full_loss()
    out: dict = {"l0": l0, "at": {}, "error": None}
    for t in range(1, STEPS[-1] + 1):
        idx = torch.randint(0, ROWS, (batch,), generator=g) if batch < ROWS else slice(None)
        opt.zero_grad()
        loss = ((base[idx] + X[idx] @ A.T @ B.T - Y[idx]) ** 2).mean()
        ctx["loss_rel"] = float(loss.detach()) / l0
        loss.backward()
        try:
            opt.step()
        except Exception as e:  # e.g. the library's LinAlgError on a diverging run
            out["error"] = f"{type(e).__name__} at step {t}"
            for s in STEPS:
                out["at"].setdefault(s, math.inf)
            break
        if t in STEPS:
            out["at"][t] = full_loss()
    return out


# ----------------------------------------------------------------------------- the paper's MF toy

def run_mf(method: str, lr: float, seed: int, iters: int = 100) -> list[float]:
    """Plain GD on ``0.5 ||B A - Y||^2`` (reflora.bench.mf's problem); losses at 0..iters."""
    from reflora.bench import mf

    torch.set_num_threads(1)
    cfg = mf.MFConfig(iters=iters)
    Y, A0, B0 = mf.make_problem(cfg, seed)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = torch.optim.SGD([A, B], lr=lr)
    if method in BASELINES:
        if BASELINES[method] is not None:
            reflora.attach(opt, [(A, B)], **BASELINES[method])
    elif method == "paper-func":
        return mf.run("reflora", lr, cfg, seed)
    else:
        attach_candidate(opt, A, B, method, {})
    losses = []
    for _ in range(iters + 1):
        opt.zero_grad()
        loss = 0.5 * (B @ A - Y).square().sum()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] > cfg.diverged:
            break
        loss.backward()
        try:
            opt.step()
        except Exception:
            losses.append(math.inf)
            break
    return losses


# ----------------------------------------------------------------------------- screens

def cells_for(screen: str) -> list[tuple]:
    """(optimizer, lr, r, k, batch, start)."""
    out = []
    if screen == "S1":
        for r in (8, 16, 32):
            for k in sorted({1, r // 4, r // 2, r}):
                for lr in (1e-3, 3e-3, 1e-2):
                    out.append(("adamw", lr, r, k, ROWS, "zero"))
    elif screen == "S2":
        for r in (8, 16):
            for k in sorted({1, r // 4, r // 2, r}):
                for lr in (3e-3, 1e-2, 3e-2):
                    out.append(("sgd-m", lr, r, k, ROWS, "zero"))
    elif screen == "S3":
        for start in ("resumed", "gaussian", "pissa", "olora"):
            for r, k in ((8, 2), (8, 8), (16, 4), (16, 16)):
                for o, lrs in (("adamw", (1e-3, 1e-2)), ("sgd-m", (3e-3, 3e-2))):
                    for lr in lrs:
                        out.append((o, lr, r, k, ROWS, start))
        for start in ("spread", "spread-resumed"):
            for r in (8, 16):
                for o, lrs in (("adamw", (1e-3, 1e-2)), ("sgd-m", (3e-3, 3e-2))):
                    for lr in lrs:
                        out.append((o, lr, r, r, ROWS, start))
    elif screen == "grid":
        opts = {"adamw": (1e-3, 3e-3, 1e-2), "adamw-wd": (1e-3, 3e-3, 1e-2), "sgd-m": (3e-3, 1e-2, 3e-2)}
        for o, lrs in opts.items():
            for b in (ROWS, 32):
                for r, k in grid():
                    for lr in lrs:
                        out.append((o, lr, r, k, b, "zero"))
    else:
        raise ValueError(screen)
    return out


def _job(key):
    m, o, lr, r, k, seed, b, start = key
    return key, run(m, o, lr, r, k, seed, b, start)


def _mf_job(key):
    m, lr, seed = key
    return key, run_mf(m, lr, seed)


def _med(runs, t):
    return statistics.median(floored(x["at"][t], x["l0"]) for x in runs)


def _div(x) -> bool:
    v = x["at"][STEPS[-1]]
    return not math.isfinite(v) or v > x["l0"]


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if 0.01 <= x < 100 else f"{x:.0e}"


def summarize(cells, methods, seeds, results, screen: str, verbose: bool = True) -> dict:
    """Print the ratio table and per-method counts; return the counts."""
    summ: dict = {}
    refs = ["lora", "paper"] if screen == "S3" else ["lora"]
    shown = [m for m in methods if m != "lora"]
    if verbose:
        print(f"\n{screen}: median loss ratio at steps {' / '.join(map(str, STEPS))} ({seeds} seeds; "
              + ("to the better of plain LoRA and the paper's form" if screen == "S3" else "to plain LoRA") + ")")
        print(f"{'opt':<8} {'start':<14} {'b':>3} {'r':>3} {'k':>3} {'lr':>6} {'plain LoRA (median)':>28} "
              + " ".join(f"{m[:22]:>22}" for m in shown))
    for m in shown:
        summ[m] = {"cells": 0, "over": 0, "div": 0, "worst": 0.0, "worst_at": None, "ahead2_klr": 0, "klr": 0,
                   "ahead12_keqr": 0, "keqr": 0, "ahead12_klr": 0, "over_lora": 0, "over_paper": 0,
                   "worst_lora": 0.0, "worst_lora_at": None, "worst_paper": 0.0, "worst_paper_at": None}
    for c in cells:
        o, lr, r, k, b, start = c
        meds = {}
        divs = {}
        for m in methods + [x for x in refs if x not in methods]:
            runs = [results[(m, o, lr, r, k, s, b, start)] for s in range(seeds)]
            meds[m] = {t: _med(runs, t) for t in STEPS}
            divs[m] = sum(map(_div, runs))
        ref = {t: min(meds[x][t] for x in refs) for t in STEPS}
        cols = []
        for m in shown:
            rl = {t: meds[m][t] / meds["lora"][t] if meds["lora"][t] > 0 else math.inf for t in STEPS}
            rr = {t: (meds[m][t] / ref[t] if math.isfinite(ref[t]) else (1.0 if not math.isfinite(meds[m][t]) else 0.0))
                  for t in STEPS}
            rat = rr if screen == "S3" else rl
            div = divs[m] > 0 and divs["lora"] == 0 and (screen != "S3" or divs["paper"] == 0)
            bad = div or any(v > TOL for v in rat.values())
            s_ = summ[m]
            s_["cells"] += 1
            s_["over"] += bad
            s_["div"] += div
            top = max(rat.values())
            if top > s_["worst"]:
                s_["worst"], s_["worst_at"] = top, [o, start, b, r, k, lr]
            if k < r:
                s_["klr"] += 1
                s_["ahead2_klr"] += rl[STEPS[-1]] <= 0.5
                s_["ahead12_klr"] += rl[STEPS[-1]] < 1 / TOL
            else:
                s_["keqr"] += 1
                s_["ahead12_keqr"] += rl[STEPS[-1]] < 1 / TOL
            if screen == "S3":
                for x in ("lora", "paper"):
                    rx = {t: meds[m][t] / meds[x][t] if meds[x][t] > 0 else math.inf for t in STEPS}
                    wx = max((v for v in rx.values() if not math.isnan(v)), default=0.0)
                    # the target against x applies where x is the better of the two at step 300
                    other = "paper" if x == "lora" else "lora"
                    if meds[x][STEPS[-1]] <= meds[other][STEPS[-1]]:
                        s_[f"over_{x}"] += wx > TOL
                        if wx > s_[f"worst_{x}"]:
                            s_[f"worst_{x}"], s_[f"worst_{x}_at"] = wx, [o, start, b, r, k, lr]
            flag = " DIV" if div else (" F" if bad else "")
            cols.append(" / ".join(_fmt(rat[t]) for t in STEPS) + flag)
        if verbose:
            base = " / ".join(f"{meds['lora'][t]:.1e}" for t in STEPS)
            extra = ""
            if screen == "S3":
                extra = "  paper/lora: " + " / ".join(_fmt(meds["paper"][t] / meds["lora"][t]) for t in STEPS)
            print(f"{o:<8} {start:<14} {b:>3} {r:>3} {k:>3} {lr:>6.0e} {base:>28} " + " ".join(f"{x:>22}" for x in cols)
                  + extra)
    if True:  # the summary, also with --quiet
        print(f"\n{screen} summary (tolerance {TOL}x at every step; S3 against the better of plain LoRA and the paper):")
        for m in shown:
            s_ = summ[m]
            line = (f"  {m:<24} over: {s_['over']:>3}/{s_['cells']:<3} div: {s_['div']:>2}  "
                    f"k<r ahead >=2x@300: {s_['ahead2_klr']:>2}/{s_['klr']:<2} (>1.2x: {s_['ahead12_klr']:>2})  "
                    f"k=r ahead >1.2x@300: {s_['ahead12_keqr']:>2}/{s_['keqr']:<2}  worst {_fmt(s_['worst'])} at {s_['worst_at']}")
            if screen == "S3":
                line += (f"\n  {'':<24} where LoRA is better: over {s_['over_lora']} (worst {_fmt(s_['worst_lora'])} at "
                         f"{s_['worst_lora_at']}); where the paper is better: over {s_['over_paper']} (worst "
                         f"{_fmt(s_['worst_paper'])} at {s_['worst_paper_at']})")
            print(line)
    return summ


def mf_report(methods, seeds, res) -> dict:
    out = {}
    print("\nmf (the paper's MF toy, plain GD): iterations to loss 1e-3 (median over seeds; - = never in 100) and "
          "median loss at iterations 20 / 50 / 100")
    for lr in (0.01, 0.03):
        for m in methods:
            runs = [res[(m, lr, s)] for s in range(seeds)]
            its = [next((i for i, v in enumerate(x) if v < 1e-3), None) for x in runs]
            hit = sorted(i for i in its if i is not None)
            med_it = statistics.median(hit) if len(hit) > seeds // 2 else None

            def at(x, i):
                return x[i] if i < len(x) else (x[-1] if math.isfinite(x[-1]) and x[-1] < 1e10 else math.inf)

            losses = [statistics.median(at(x, i) for x in runs) for i in (20, 50, 100)]
            out[f"{m}@{lr}"] = {"iters": med_it, "loss": losses}
            print(f"  lr {lr:<5} {m:<26} iters {('-' if med_it is None else med_it)!s:>4}   "
                  + " / ".join(f"{v:.1e}" for v in losses))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screen", default="S1", choices=["S1", "S2", "S3", "mf", "grid"])
    ap.add_argument("--methods", nargs="+", default=["near"])
    ap.add_argument("--seeds", type=int, default=None, help="3 (5 for grid)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None)
    ap.add_argument("--quiet", action="store_true", help="print only the summary")
    ap.add_argument("--optimizers", nargs="+", default=None, help="keep only these optimizers' cells")
    ap.add_argument("--trace", nargs=5, metavar=("OPT", "LR", "R", "K", "START"), default=None,
                    help="print per-step diagnostics of lora and --methods on one cell (seed 0), then stop")
    args = ap.parse_args()
    if args.trace:
        o, lr, r, k, st = args.trace
        print_trace(["lora", *args.methods], o, float(lr), int(r), int(k), 0, st)
        return
    if args.from_json:
        with open(args.from_json) as f:
            d = json.load(f)
        if d["screen"] == "mf":
            res = {(x["method"], x["lr"], x["seed"]): x["losses"] for x in d["runs"]}
            mf_report(d["methods"], d["seeds"], res)
            return
        res = {tuple(x["key"]): dict(x, at={int(t): v for t, v in x["at"].items()}) for x in d["runs"]}
        summarize([tuple(c) for c in d["cells"]], d["methods"], d["seeds"], res, d["screen"], not args.quiet)
        return
    seeds = args.seeds or (5 if args.screen == "grid" else 3)
    torch.set_num_threads(1)
    for m in args.methods:
        if m not in BASELINES:
            parse(m)
    if args.screen == "mf":
        methods = ["lora", "paper-func", "paper", "default", *[m for m in args.methods if m not in
                                                             ("lora", "paper-func", "paper", "default")]]
        jobs = [(m, lr, s) for lr in (0.01, 0.03) for m in methods for s in range(seeds)]
        with ProcessPoolExecutor(args.workers) as pool:
            res = dict(pool.map(_mf_job, jobs))
        summ = mf_report(methods, seeds, res)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"screen": "mf", "methods": methods, "seeds": seeds, "summary": summ,
                           "runs": [{"method": k[0], "lr": k[1], "seed": k[2], "losses": v} for k, v in res.items()]}, f)
        return
    cells = cells_for(args.screen)
    if args.optimizers:
        cells = [c for c in cells if c[0] in args.optimizers]
    base = ["lora", "paper"] if args.screen == "S3" else ["lora"]
    methods = base + [m for m in args.methods if m not in base]
    jobs = [(m, o, lr, r, k, s, b, st) for (o, lr, r, k, b, st) in cells for m in methods for s in range(seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        res = dict(pool.map(_job, jobs, chunksize=4))
    summ = summarize(cells, methods, seeds, res, args.screen, not args.quiet)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"screen": args.screen, "methods": methods, "seeds": seeds, "cells": cells, "summary": summ,
                       "runs": [{"key": list(k), **v} for k, v in res.items()]}, f)



# ----------------------------------------------------------------------------- diagnostics

def trace(method: str, opt_name: str, lr: float, r: int, k: int, seed: int = 0, start: str = "zero",
          at=(1, 2, 3, 5, 10, 20, 50, 100, 150, 300)) -> list[dict]:
    """Per-step diagnostics (``--trace``), in the SVD basis of ``B A = U diag(s) V^T``: loss, the
    spectrum (s_1/s_0, s_{k-1}/s_0, s_k/s_0: the smallest needed and the largest unneeded
    direction), ``|A v_j|`` and ``|B^T u_j|`` for the top direction and the median over the
    directions the target does not need, the spread (participation ratio over the r coordinates)
    of the top direction, the RMS of AdamW's normalised update, and ``dW / lr``."""
    torch.set_num_threads(1)
    X, Y, A, B, g, W_res = problem_start(seed, r, k, start)
    opt = make_opt(opt_name, lr, A, B)
    ctx: dict = {}
    if method in BASELINES:
        if BASELINES[method] is not None:
            reflora.attach(opt, [(A, B)], **BASELINES[method])
    else:
        attach_candidate(opt, A, B, method, ctx)
    base = torch.zeros(ROWS, N_OUT) if W_res is None else X @ W_res
    rows, prev = [], (B @ A).detach().clone()
    l0 = float(((base + X @ A.T @ B.T - Y) ** 2).mean())
    for t in range(1, max(at) + 1):
        opt.zero_grad()
        loss = ((base + X @ A.T @ B.T - Y) ** 2).mean()
        ctx["loss_rel"] = float(loss.detach()) / l0
        loss.backward()
        opt.step()
        W = (B @ A).detach()
        if t in at:
            U, sv, Vh = torch.linalg.svd(W.double())
            a_dir = (A.detach().double() @ Vh.mT).norm(dim=0)
            b_dir = (B.detach().double().mT @ U).norm(dim=0)
            top = A.detach().double() @ Vh[0]
            row = {"step": t, "loss": float(((base + X @ W.T - Y) ** 2).mean()) / l0,
                   "s1": float(sv[min(1, r - 1)] / sv[0]), "sk1": float(sv[k - 1] / sv[0]),
                   "sk": float(sv[k] / sv[0]) if k < r else math.nan,
                   "a0": float(a_dir[0]), "b0": float(b_dir[0]),
                   "a_rest": float(a_dir[k:r].median()) if k < r else math.nan,
                   "b_rest": float(b_dir[k:r].median()) if k < r else math.nan,
                   "spread": float(top.square().sum() ** 2 / top.pow(4).sum()),
                   "dW": float((W - prev).norm() / lr)}
            if "exp_avg" in opt.state[A]:
                for name, p in (("uA", A), ("uB", B)):
                    st = opt.state[p]
                    u = (st["exp_avg"] / (1 - 0.9**t)) / ((st["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8)
                    row[name] = float(u.square().mean().sqrt())
            rows.append(row)
        prev = W.clone()
    return rows


def print_trace(methods, o, lr, r, k, seed=0, start="zero"):
    print(f"\n--trace: {o} lr={lr:g}, r={r}, k={k}, seed {seed}, start {start} (loss relative to the initial)")
    print(f"{'method':<22} {'step':>4} {'loss':>8} {'s1/s0':>7} {'sk-1/s0':>7} {'sk/s0':>7} {'|Av0|':>6} {'|B^Tu0|':>7} "
          f"{'|Avj|':>8} {'|B^Tuj|':>8} {'spread':>6} {'rmsuA':>6} {'rmsuB':>6} {'dW/lr':>7}")
    for m in methods:
        for x in trace(m, o, lr, r, k, seed, start):
            print(f"{m[:22]:<22} {x['step']:>4} {x['loss']:>8.1e} {x['s1']:>7.1e} {x['sk1']:>7.1e} {x['sk']:>7.1e} "
                  f"{x['a0']:>6.2f} {x['b0']:>7.2f} {x['a_rest']:>8.1e} {x['b_rest']:>8.1e} {x['spread']:>6.2f} "
                  f"{x.get('uA', math.nan):>6.3f} {x.get('uB', math.nan):>6.3f} {x['dW']:>7.1f}")


if __name__ == "__main__":
    main()
