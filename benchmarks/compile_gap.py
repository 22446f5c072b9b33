"""Eager against compiled RefLoRA steps in float32: how far apart, and why.

A PEFT MLP (three LoRA'd ``Linear`` layers, r = 8, ``B = 0``) fits a random regression target
with AdamW. For each mode the same run is done twice, with an eager ``opt.step()`` and with
``torch.compile(opt.step)``, and the table prints the largest relative difference of ``B @ A``
over the pairs at a few steps. Two references sit beside it in the same run:

* ``bare``: AdamW without RefLoRA, compiled against eager: torch's own difference, the
  round-off that a compiled AdamW step makes differently;
* ``sensitivity``: two *eager* runs of the same mode, the second with its ``A`` factors
  perturbed by 1e-6 relative at the start. It measures how much the training dynamics amplify
  a tiny difference, with no compiled code involved. Where the compiled gap grows like this
  row, the growth is the dynamics', not a disagreement of the eager and traced code paths.

A third check compares the two r x r kernel paths on the Grams of the eager run: the eager CPU
shortcut (two ``eigh``) against the general kernel that traced steps run.

Run: ``python benchmarks/compile_gap.py`` (``--help``; ``--backend inductor`` for code generation,
~20 s per graph on a 2-core CPU; the default ``aot_eager`` traces the same graphs and rounds the
same way here). Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import reflora
import reflora._kernels as kernels

MODES = ["full/parameter", "full/gradient", "scalar/parameter", "scalar/gradient"]


def build(seed: int, width: int, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2", "4"]))


def deltas(model: nn.Module) -> list[torch.Tensor]:
    return [
        (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().clone()
        for mod in model.modules() if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})
    ]


def run(mode: str, lr: float, steps: int, *, compiled: str | None = None, perturb: float = 0.0,
        width: int = 64, r: int = 8, seed: int = 0, resolved: float | None = None) -> list[list[torch.Tensor]]:
    """``B @ A`` of every pair after each step."""
    torch._dynamo.reset()
    model = build(seed, width, r)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.mul_(1 + perturb * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(seed + 2)
    X, Y = torch.randn(128, 32, generator=g), torch.randn(128, 8, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if mode != "bare":
        variant, space = mode.split("/")
        reflora.attach(opt, model, variant=variant, space=space, **({} if resolved is None else {"resolved": resolved}))
    step = torch.compile(opt.step, backend=compiled) if compiled else opt.step
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (model(X) - Y).square().mean().backward()
        step()
        out.append(deltas(model))
    return out


def gap(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> list[float]:
    """Per step: the largest relative difference of ``B @ A`` over the pairs."""
    return [max(((x - y).norm() / x.norm().clamp_min(1e-30)).item() for x, y in zip(s, t)) for s, t in zip(a, b)]


def kernel_agreement(lr: float, steps: int, resolved: float | None) -> float:
    """Largest relative difference between the eager shortcut's and the general kernel's
    ``(S, S^{-1})`` on every Gram stack an eager full/gradient run hands to the kernel."""
    worst = [0.0]
    original = kernels.eager_kernel

    def both(X, Y, eps, frame, general, metric=True, resolved=0.0):
        fast = original(X, Y, eps, frame, general, metric, resolved)
        slow = general(X, Y)
        worst[0] = max(worst[0], *(((u - v).norm() / v.norm().clamp_min(1e-300)).item() for u, v in zip(fast, slow)))
        return fast

    kernels.eager_kernel = both
    try:
        run("full/gradient", lr, steps, resolved=resolved)
    finally:
        kernels.eager_kernel = original
    return worst[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (default aot_eager)")
    ap.add_argument("--modes", nargs="+", default=MODES)
    ap.add_argument("--resolved", type=float, default=None, help="attach's resolved (default: attach's default)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, float32, AdamW, backend {args.backend}, {args.steps} steps, "
          f"{args.seeds} seeds (median); the largest relative difference of B @ A over the pairs, "
          "after step 4 and over all steps")
    for lr in args.lrs:
        print(f"\nlr {lr:g}")
        print("| mode | compiled vs eager: step 4, all steps | x bare | eager vs perturbed eager: step 4, all steps |")
        print("|---|---|---|---|")
        bare = None
        for mode in ["bare", *args.modes]:
            comp, sens = [], []
            for seed in range(args.seeds):
                eager = run(mode, lr, args.steps, seed=seed, resolved=args.resolved)
                c = gap(eager, run(mode, lr, args.steps, compiled=args.backend, seed=seed, resolved=args.resolved))
                s = gap(eager, run(mode, lr, args.steps, perturb=1e-6, seed=seed, resolved=args.resolved))
                comp.append((c[min(3, len(c) - 1)], max(c)))
                sens.append((s[min(3, len(s) - 1)], max(s)))
            med = lambda v, i: statistics.median(x[i] for x in v)  # noqa: E731
            if bare is None:
                bare = med(comp, 1)
            print(f"| {mode} | {med(comp, 0):.1e}, {med(comp, 1):.1e} | {med(comp, 1) / bare:.1f} "
                  f"| {med(sens, 0):.1e}, {med(sens, 1):.1e} |", flush=True)
        print(f"eager shortcut vs general kernel, (S, S^-1), every step of full/gradient (seed 0): "
              f"{kernel_agreement(lr, args.steps, args.resolved):.1e} relative")


if __name__ == "__main__":
    main()
