"""What traced discovery costs: once at attach, in forward passes, and per step (nothing).

    python benchmarks/traced_discovery.py                 # BERT-base size (110M), torchtune-style LoRA
    python benchmarks/traced_discovery.py --layers 2 --hidden 128 --steps 5   # a quick run

The model is a BERT encoder built from a config (random weights, nothing downloaded) whose
query / value projections get a torchtune-style LoRA (``lora_a`` / ``lora_b`` submodules, which
no structural finder knows), so every pair is found by tracing. Printed:

* forward: one forward pass on the example batch (median of 3);
* find_pairs: ``find_pairs(model, example_inputs=batch)``, i.e. finders, the traced forward
  pass, the gradient screen (forward + backward), the baseline and the joint refactor check;
  also in units of forward passes;
* step: forward + backward + ``AdamW.step()`` with RefLoRA attached from the traced pairs
  (``attach(opt, model, example_inputs=batch)``) and from the same pairs passed explicitly,
  alternated in ABBA order, median over the steps. The two handles hold the same pairs; the tracer is not
  active during steps, so the difference is noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import reflora
from reflora.adapters import find_pairs


class LoRALinear(nn.Module):
    """torchtune's LoRALinear forward (base frozen, lora_a / lora_b submodules)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = 2.0

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def build(layers: int, hidden: int, rank: int) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                                  intermediate_size=4 * hidden)
    model = transformers.BertModel(cfg)
    model.requires_grad_(False)
    for layer in model.encoder.layer:
        att = layer.attention.self
        att.query = LoRALinear(att.query, rank)
        att.value = LoRALinear(att.value, rank)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = build(args.layers, args.hidden, args.rank)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids}

    def forward():
        with torch.no_grad():
            model(**batch)

    forward()
    fwd = statistics.median(_time(forward) for _ in range(3))
    t0 = time.perf_counter()
    pairs = find_pairs(model, example_inputs=batch)
    find_s = time.perf_counter() - t0
    print(f"model: BERT {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.0f}M parameters, "
          f"{len(pairs)} LoRA pairs (rank {args.rank}) found by tracing")
    print(f"forward pass:   {fwd * 1e3:8.1f} ms")
    print(f"find_pairs:     {find_s * 1e3:8.1f} ms  ({find_s / fwd:.1f} forward passes)")

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_t, opt_e = torch.optim.AdamW(trainable, lr=1e-4), torch.optim.AdamW(trainable, lr=1e-4)
    t0 = time.perf_counter()
    traced = reflora.attach(opt_t, model, example_inputs=batch)
    attach_s = time.perf_counter() - t0
    explicit = reflora.attach(opt_e, pairs)
    assert [(p.A, p.B) for p in traced.pairs] == [(p.A, p.B) for p in explicit.pairs]
    print(f"attach(..., example_inputs=): {attach_s * 1e3:8.1f} ms")
    times: dict[str, list[float]] = {"traced": [], "explicit": []}
    rounds = (("traced", opt_t), ("explicit", opt_e))
    for i in range(args.steps + 1):  # alternated, ABBA order; the first round warms up
        for label, opt in rounds if i % 2 else rounds[::-1]:

            def step():
                opt.zero_grad()
                model(**batch).last_hidden_state.square().mean().backward()
                opt.step()

            dt = _time(step)
            if i:
                times[label].append(dt)
    for label, ts in times.items():
        print(f"step, pairs {label:8s}: {statistics.median(ts) * 1e3:8.1f} ms (median of {len(ts)})")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
