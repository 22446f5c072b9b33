"""The error a low-bit transport adds against the 32-bit transport on the same state.

For each low-bit optimizer (bitsandbytes 8-bit, torchao 8-bit / 4-bit / FP8) and each rank r,
a pair A (r, m), B (n, r) gets Adam-like moments of random gradients in the optimizer's own
quantized storage. One full-variant refactor of an imbalanced pair then moves them two ways:

* reference: the 32-bit transport (reflora.transport.STATE_KINDS) on the dequantized moments;
* low-bit: reflora.lowbit's transport (dequantize, the same map, requantize into the storage).

The table gives ||low-bit - reference|| / ||reference|| per moment (A and B together), and the
quantizer's own floor on the same state: one dequantize-quantize round trip with no map.
torchao's block size is a constructor argument and is swept; bitsandbytes' is fixed (256).

    python benchmarks/lowbit_transport.py [--ranks 4 8 16 32 64] [--size 1024]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from reflora.functional import refactor_transform
from reflora.pairs import LoRAPair
from reflora.transport import STATE_KINDS, get_state_transport

CASES = [  # (library, optimizer, block sizes; None: fixed)
    ("bitsandbytes", "AdamW8bit", [None]),
    ("bitsandbytes", "Lion8bit", [None]),
    ("bitsandbytes", "AdEMAMix8bit", [None]),
    ("torchao", "AdamW8bit", [64, 256, 1024]),
    ("torchao", "AdamW4bit", [32, 128, 512]),
    ("torchao", "AdamWFp8", [64, 256, 1024]),
]


def build(lib: str, name: str, block: int | None, A, B, gen):
    """The optimizer with moments of 8 random gradient steps in its own storage."""
    if lib == "bitsandbytes":
        import bitsandbytes as bnb

        opt = getattr(bnb.optim, name)([A, B], lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(8):
                for p in (A, B):
                    p.grad = torch.randn(p.shape, generator=gen) * (1 + 4 * torch.rand(p.shape[0], 1, generator=gen))
                opt.step()
        return opt
    import torchao.optim

    opt = getattr(torchao.optim, name)([A, B], lr=1e-3, block_size=block)
    for p in (A, B):  # torchao's step compiles; make its state as its first step does, then fill it
        grads = torch.randn(8, *p.shape, generator=gen) * (1 + 4 * torch.rand(p.shape[0], 1, generator=gen))
        st = opt.state[p]
        st["step"] = torch.tensor(8.0)
        st["exp_avg"], st["exp_avg_sq"] = opt._new_buffer(p, True), opt._new_buffer(p, False)
        st["exp_avg"].copy_(grads.mean(0))
        st["exp_avg_sq"].copy_(grads.square().mean(0))
    return opt


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def measure(lib: str, name: str, block: int | None, r: int, size: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    A = torch.nn.Parameter(3 * torch.randn(r, size, generator=gen))
    B = torch.nn.Parameter(0.05 * torch.randn(size, r, generator=gen))
    opt = build(lib, name, block, A, B, gen)
    tr = get_state_transport(opt)
    before = [tr.load(opt.state[p], p) for p in (A, B)]
    # the quantizer's floor: store the moments as they are, read them back
    floor = {}
    for key in before[0]:
        for k, p in enumerate((A, B)):
            tr.store(opt.state[p], key, before[k][key])
        again = [tr.load(opt.state[p], p) for p in (A, B)]
        floor[key] = rel(torch.cat([again[0][key].flatten(), again[1][key].flatten()]),
                         torch.cat([before[0][key].flatten(), before[1][key].flatten()]))
        for k, p in enumerate((A, B)):
            tr.store(opt.state[p], key, before[k][key])
    before = [tr.load(opt.state[p], p) for p in (A, B)]
    T = refactor_transform(A.detach()[None].double(), B.detach()[None].double(), variant="full")
    T = type(T)(T.left.float(), T.right.float())
    tr.move_state(opt, [LoRAPair("p", A, B)], T, "square")
    after = [tr.load(opt.state[p], p) for p in (A, B)]
    out = {}
    for key, kind in tr.kinds.items():
        if key not in before[0]:
            continue
        ref_a, ref_b = STATE_KINDS[kind].apply(T, before[0][key][None], before[1][key][None], "square")
        got = torch.cat([after[0][key].flatten(), after[1][key].flatten()])
        out[f"{kind}:{key}"] = rel(got, torch.cat([ref_a.flatten(), ref_b.flatten()]))
        out[f"floor:{key}"] = floor[key]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--size", type=int, default=1024, help="m = n of the pair")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"relative error of the low-bit transport vs the 32-bit transport (one full refactor, m = n = {args.size});"
          " in brackets: one dequantize-quantize round trip with no map")
    print("| library | optimizer | block | r | first moment | (no-map round trip) | second moment | (no-map round trip) |")
    print("|---|---|---|---|---|---|---|---|")
    for lib, name, blocks in CASES:
        for block in blocks:
            for r in args.ranks:
                res = measure(lib, name, block, r, args.size)
                first = [v for k, v in res.items() if k.startswith("first:")]
                firstf = [res["floor:" + k.split(":", 1)[1]] for k in res if k.startswith("first:")]
                second = [v for k, v in res.items() if k.startswith("second:")]
                secondf = [res["floor:" + k.split(":", 1)[1]] for k in res if k.startswith("second:")]
                fmt = lambda xs: "/".join(f"{x:.2e}" for x in xs) if xs else "-"  # noqa: E731
                print(f"| {lib} | {name} | {block or 256} | {r} | {fmt(first)} | {fmt(firstf)} | {fmt(second)} "
                      f"| {fmt(secondf)} |", flush=True)


if __name__ == "__main__":
    main()
