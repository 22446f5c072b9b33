"""RefLoRA's hook against a LLaMA-7B-shape training step, side by side in one process (GPU check).

(a) The hook alone over all LoRA pairs of LLaMA-7B (32 layers x q, k, v, o, gate, up, down =
    224 pairs), for each rank: eigh vs Newton-Schulz solver, grouped (one batched call per
    shape) vs a per-layer loop (one call per pair), eager vs ``compile=True``, in gradient and
    parameter space (full variant), and the scalar variant.
(b) The training step it is compared with: forward + backward of one LLaMA-7B decoder layer
    (hidden 4096, 32 heads, MLP 11008) in bfloat16 with LoRA on the same seven targets, at
    ``--tokens`` tokens, times the number of layers (embeddings and the LM head, a few percent
    of a 7B step, are left out, which makes the reported ratio pessimistic).

Prints one table: hook time per step and its share of the estimated 7B training step. Target
(issue 10): full RefLoRA adds at most 1% to a 7B-shape step. Runs on CPU too with small sizes
(``--hidden 64 --inter 128 --heads 2 --layers 2 --tokens 64``), which the test suite does.
Run: ``python benchmarks/gpu_overhead.py --device cuda``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import reflora


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def lora_pairs(layers: int, hidden: int, inter: int, r: int, device: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Factor pairs (with gradients) of every LoRA target of a LLaMA-shaped model, float32."""
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter), (hidden, inter), (inter, hidden)]  # q k v o gate up down
    g = torch.Generator(device="cpu").manual_seed(0)
    pairs = []
    for _ in range(layers):
        for m, n in shapes:
            A = nn.Parameter((torch.randn(r, m, generator=g) / m**0.5).to(device))
            B = nn.Parameter((0.01 * torch.randn(n, r, generator=g)).to(device))
            A.grad = torch.randn(r, m, generator=g).to(device)
            B.grad = torch.randn(n, r, generator=g).to(device)
            pairs.append((A, B))
    return pairs


def hook_time(pairs, repeats: int, device: str, per_layer: bool = False, **kw) -> float:
    """Median time of RefLoRA's pre-step hook over ``pairs`` (grouped, or one handle per pair)."""
    params = [p for ab in pairs for p in ab]
    groups = [[ab] for ab in pairs] if per_layer else [pairs]
    kw.setdefault("warmup_steps", 0)  # every timed call acts (not the default's warmup)
    handles = [reflora.attach(torch.optim.SGD([p for ab in grp for p in ab], lr=0.0), grp, **kw) for grp in groups]
    grads = [p.grad.clone() for p in params]

    def run():
        for h in handles:
            h._pre_hook(h.optimizer, (), {})

    def restore():  # gradient space rewrites the gradients; parameter space the factors too
        for p, gr in zip(params, grads):
            p.grad.copy_(gr)

    def timed():
        restore()
        run()

    t_restore = _median_time(restore, repeats, device)
    t = _median_time(timed, repeats, device) - t_restore
    for h in handles:
        h.remove()
    return max(t, 0.0)


def layer_step_time(hidden: int, inter: int, heads: int, r: int, tokens: int, repeats: int, device: str) -> float:
    """Forward + backward of one LLaMA decoder layer with LoRA on its 7 linear maps, bfloat16."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                   num_key_value_heads=heads, num_hidden_layers=1, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    layer = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"]))
    block = layer.base_model.model.model.layers[0]
    rotary = layer.base_model.model.model.rotary_emb
    seq = min(tokens, 2048)
    batch = max(1, tokens // seq)
    x = torch.randn(batch, seq, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq, device=device)[None].expand(batch, -1)
    emb = rotary(x, pos)

    def step():
        out = block(x, position_embeddings=emb, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    return _median_time(step, repeats, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per training step (default 4 x 2048)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-ranks", type=int, nargs="*", default=[16],
                    help="ranks at which the eigh rows are also timed with compile=True (a compile per shape)")
    ap.add_argument("--no-per-layer", action="store_true", help="skip the per-layer rows")
    args = ap.parse_args(argv)
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {name}; LLaMA shapes: {args.layers} layers x 7 targets, hidden {args.hidden}, "
          f"MLP {args.inter}; training step = {args.layers} x one bf16 decoder layer fwd+bwd at {args.tokens} tokens")
    configs = [("full", "gradient", "eigh"), ("full", "gradient", "newton_schulz"),
               ("full", "parameter", "eigh"), ("full", "parameter", "newton_schulz"), ("scalar", "gradient", "eigh")]
    head = f"{'r':>3} {'7B step':>9} {'mode':<30} {'grouped':>9} {'per-layer':>10} {'compiled':>9} {'grouped/step':>13}"
    print(head + "\n" + "-" * len(head))
    for r in args.ranks:
        t_step = args.layers * layer_step_time(args.hidden, args.inter, args.heads, r, args.tokens, max(3, args.repeats // 2), dev)
        pairs = lora_pairs(args.layers, args.hidden, args.inter, r, dev)
        for variant, space, solver in configs:
            kw = dict(variant=variant, space=space, solver=solver)
            if solver == "newton_schulz":
                kw["frame"] = "symmetric"
            label = f"{variant}/{space}/{solver}" if variant == "full" else f"{variant}/{space}"
            t_g = hook_time(pairs, args.repeats, dev, **kw)
            t_l = float("nan") if args.no_per_layer else hook_time(pairs, max(2, args.repeats // 4), dev, per_layer=True, **kw)
            compiled = r in args.compile_ranks and variant == "full" and solver == "eigh"
            t_c = hook_time(pairs, args.repeats, dev, compile=True, **kw) if compiled else float("nan")
            print(f"{r:>3} {t_step * 1e3:>7.0f}ms {label:<30} {t_g * 1e3:>7.1f}ms {t_l * 1e3:>8.1f}ms "
                  f"{t_c * 1e3:>7.1f}ms {t_g / t_step:>12.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
