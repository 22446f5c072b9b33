"""What every rank of a multi-process test shares: its rank, the model and data, the explicit
single-process reference (RefLoRA's math written out in float64 from the closed form, and a
hand-rolled AdamW / SGD), joining the process group. Used by distributed_worker.py's scenarios."""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import peft  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import reflora  # noqa: E402
from reflora.adapters import find_pairs  # noqa: E402


RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
OUT = Path(os.environ.get("REFLORA_OUT", "."))
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64
LR_ADAMW = 3e-3


# ----------------------------------------------------------------------------- model and data


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    # init_lora_weights=False: B random as well, so every direction of every pair is live from step 1
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(model, lcfg)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def my_rows(ids: torch.Tensor) -> torch.Tensor:
    per = GLOBAL_BATCH // WORLD
    return ids[RANK * per:(RANK + 1) * per]


def layers(model: nn.Module):
    return model.base_model.model.model.layers


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR_ADAMW, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    raise ValueError(name)


# ----------------------------------------------------------------------------- explicit reference


def _sqrtm(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, V = torch.linalg.eigh(0.5 * (M + M.mT))
    w = w.clamp_min(0.0)
    return (V * w.sqrt()) @ V.mT, (V * w.rsqrt()) @ V.mT


def ref_transform(A, B, variant: str, frame: str):
    """``(S, S^-1, left, right)`` of one pair in float64, from the closed form:
    ``S = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}`` (the geometric mean ``X^{-1} # Y``),
    ``left = P^T``, ``right = P^{-T}`` with ``P = S^{1/2}`` (symmetric frame) or ``S^{1/2} V``
    (paper frame: ``V`` the eigenvectors of ``S^{-1/2} Y S^{-1/2}`` in descending order, with the
    documented tie-breaker (docs/theory.md), each column's largest entry positive). Scalar variant: ``p = sqrt(||B|| / ||A||)``."""
    A, B = A.double(), B.double()
    if variant == "scalar":
        p = (B.norm() / A.norm()).sqrt()
        return p**2, p**-2, p, 1 / p
    X, Y = A @ A.mT, B.mT @ B
    Xh, Xih = _sqrtm(X)
    S = Xih @ _sqrtm(Xh @ Y @ Xh)[0] @ Xih
    Sh, Sih = _sqrtm(S)
    left, right = Sh, Sih
    if frame == "paper":
        G = Sih @ Y @ Sih
        # the documented rule (docs/theory.md): the exact eigenbasis of G where its eigenvalues
        # (the singular values sigma of B A) are apart by max(1e-4, 1e-6 c) of their mean,
        # c = cond(X) sigma_max / sigma_min; else the tie-breaker delta * diag(r-1, ..., 0) with
        # delta = max(1e-7, 1e-8 cond(S)) * mean(diag G); then each column of right = P^{-T} has
        # its largest entry positive
        sig = torch.linalg.eigvalsh(G).clamp_min(0)
        lam = torch.linalg.eigvalsh(X)
        c = float(lam.max() / lam.min() * sig.max() / sig.min())
        separated = float(sig.diff().min()) >= min(max(1e-4, 1e-6 * c), 1.0) * float(sig.mean())
        s = torch.linalg.eigvalsh(S)
        delta = 0.0 if separated else min(max(1e-8 * float(s.max() / s.min()), 1e-7), 1e-3) * float(G.diagonal().mean())
        G = G + torch.diag(delta * torch.arange(G.shape[0] - 1, -1, -1, dtype=G.dtype))
        _, V = torch.linalg.eigh(-0.5 * (G + G.mT))
        left, right = V.mT @ Sh, Sih @ V
        idx = right.abs().argmax(0)
        sign = torch.sign(right[idx, torch.arange(right.shape[1])])
        left, right = sign[:, None] * left, right * sign
    return S, torch.linalg.inv(S), left, right


def _lmul(T, x):
    return (T * x.double() if T.dim() == 0 else T @ x.double()).float()


def _rmul(x, T):
    return (x.double() * T if T.dim() == 0 else x.double() @ T).float()


def ref_reflora(A, B, gA, gB, state, variant: str, space: str, frame: str):
    """One RefLoRA step before the optimizer's: returns new ``(A, B, gA, gB)`` and updates ``state``
    (``{"exp_avg": (mA, mB), "exp_avg_sq": (vA, vB)}`` or ``{"momentum": (bA, bB)}``) in place."""
    S, S_inv, left, right = ref_transform(A, B, variant, frame)
    if space == "gradient":
        return A, B, _lmul(S_inv, gA), _rmul(gB, S)
    sq = (lambda T: T * T)
    rT, lT = right.mT if right.dim() else right, left.mT if left.dim() else left
    for key, (sA, sB) in list(state.items()):
        if key == "exp_avg_sq":
            state[key] = (_lmul(sq(rT), sA), _rmul(sB, sq(lT)))
        else:
            state[key] = (_lmul(rT, sA), _rmul(sB, lT))
    return _lmul(left, A), _rmul(B, right), _lmul(rT, gA), _rmul(gB, lT)


class RefOptimizer:
    """AdamW (torch's formula, weight_decay 0) or SGD with momentum 0.9, on a list of tensors."""

    def __init__(self, name: str):
        self.name, self.t = name, 0

    def step(self, params, grads, states):
        self.t += 1
        for p, g, st in zip(params, grads, states):
            if self.name == "adamw":
                lr, b1, b2, eps = LR_ADAMW, 0.9, 0.999, 1e-8
                m, v = st.setdefault("exp_avg", torch.zeros_like(p)), st.setdefault("exp_avg_sq", torch.zeros_like(p))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))
            else:
                lr, mu = 0.5, 0.9
                if "momentum" not in st:
                    st["momentum"] = g.clone()
                else:
                    st["momentum"].mul_(mu).add_(g)
                p.add_(st["momentum"], alpha=-lr)


def pair_states(states_A, states_B):
    keys = states_A.keys()
    return {k: (states_A[k], states_B[k]) for k in keys}


@functools.lru_cache(maxsize=None)  # the same reference serves every scenario of a launch that asks for it
def reference_run(variant, space, opt_name, steps, frame, reflora_on=True):
    """The single-process reference trajectory: ``{pair name: [B @ A after step k]}``."""
    model = build_model(0)
    pairs = find_pairs(model)
    opt = RefOptimizer(opt_name)
    st = {p.name: ({}, {}) for p in pairs}
    traj = {p.name: [] for p in pairs}
    for step in range(steps):
        ids = batch(step)
        for p in pairs:
            p.A.grad = p.B.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        params, grads, states = [], [], []
        with torch.no_grad():
            for p in pairs:
                A, B, gA, gB = p.A.detach().clone(), p.B.detach().clone(), p.A.grad.clone(), p.B.grad.clone()
                sA, sB = st[p.name]
                if reflora_on:
                    moved = pair_states(sA, sB)
                    A, B, gA, gB = ref_reflora(A, B, gA, gB, moved, variant, space, frame)
                    for k, (a, b) in moved.items():
                        sA[k], sB[k] = a, b
                p.A.copy_(A)
                p.B.copy_(B)
                params += [p.A.data, p.B.data]
                grads += [gA, gB]
                states += [sA, sB]
            opt.step(params, grads, states)
            for p in pairs:
                traj[p.name].append((p.B @ p.A).clone())
    return traj


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- distributed side


def init() -> None:
    if dist.is_initialized():  # (several scenarios in one launch)
        return
    if WORLD > 1 or os.environ.get("REFLORA_FORCE_PG"):
        dist.init_process_group("gloo", init_method="file://" + os.environ["REFLORA_STORE"], rank=RANK,
                                world_size=WORLD)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor, as a copy (a plain tensor would otherwise be changed by the next step)."""
    if t is None:
        return None
    return t.full_tensor() if reflora.distributed.is_dtensor(t) else t.detach().clone()
