"""Memory of a QLoRA step with and without RefLoRA, and what RefLoRA keeps per pair.

Part 1 (peak): a 4-bit nf4 Llama (built from a config, saved and loaded back through
BitsAndBytesConfig), PEFT all-linear r=16, prepare_model_for_kbit_training with gradient
checkpointing, bitsandbytes PagedAdamW8bit; a few steps in a fresh process per configuration.
Reported: the process's peak RSS (ru_maxrss) on CPU, torch.cuda.max_memory_allocated where CUDA
exists (--device cuda).

Part 2 (persistent, per pair): the LLaMA-7B LoRA shapes (r=16; q, k, v, o 4096x4096, gate and up
4096->11008, down 11008->4096), one pair of each shape, a few steps with AdamW8bit (and
torch AdamW for comparison). Measured: the bytes of every tensor RefLoRA's handle holds between
steps (walked from the handle; the factors and the optimizer excluded) and of the optimizer's
state for those pairs (codes, block scales, 32-bit moments). Scaled to 32 layers (224 pairs).
The transport's scratch (float32 copies of one pair's moments, alive while that pair is moved;
reflora.lowbit moves a group pair by pair) is computed from the shapes, not measured:
4 bytes x r (m + n) x (moments + 3) for the largest pair (the dequantized moments, then the core
view, the mapped result and the write-back buffer of one moment at a time).

    python benchmarks/qlora_memory.py [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings

import torch

CONFIGS = ["no RefLoRA", "full, parameter", "full, gradient", "scalar, parameter"]
SHAPES_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def tensor_bytes(obj, skip_ids: set[int], seen: set[int] | None = None) -> int:
    """Bytes of the tensors reachable from ``obj`` (attributes, containers), storages counted once;
    objects in ``skip_ids`` (factors, optimizer) and modules are not entered."""
    seen = set() if seen is None else seen
    if id(obj) in skip_ids or id(obj) in seen or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, type)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, skip_ids, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v, skip_ids, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, skip_ids, seen) for v in vars(obj).values())
    if hasattr(obj, "__slots__"):
        return sum(tensor_bytes(getattr(obj, s, None), skip_ids, seen) for s in obj.__slots__)
    return 0


def state_bytes(opt, params) -> int:
    total = 0
    for p in params:
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                inner = [getattr(v, n) for n in ("codes", "scale") if hasattr(v, n)]  # torchao subclasses
                total += sum(t.untyped_storage().nbytes() for t in inner) if inner else v.untyped_storage().nbytes()
    return total


def one_run(config: str, steps: int, device: str) -> dict:
    """Part 1 in this (fresh) process."""
    import bitsandbytes as bnb
    import peft
    import transformers

    import reflora
    from reflora.adapters import find_pairs

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8)
    with tempfile.TemporaryDirectory() as folder:
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map=device)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    handle = None
    if config != "no RefLoRA":
        variant, space = (s.strip() for s in config.split(","))
        handle = reflora.attach(opt, find_pairs(model), variant=variant, space=space)
    ids = torch.randint(0, 512, (4, 128), device=device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    out = {"config": config, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_steps_mib": rss0 / 1024, "opt_state_mib": state_bytes(opt, params) / 2**20}
    if device == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if handle is not None:
        skip = {id(p) for p in params} | {id(opt)}
        out["reflora_persistent_kib"] = tensor_bytes(handle, skip) / 1024
    return out


def per_pair_7b(steps: int) -> list[dict]:
    """Part 2: RefLoRA's persistent bytes and the optimizer state, one LLaMA-7B pair of each shape."""
    import bitsandbytes as bnb

    import reflora

    warnings.simplefilter("ignore")
    rows = []
    r = 16
    for opt_name in ("bnb AdamW8bit", "torch AdamW"):
        for variant, space, interval in (("full", "parameter", 1), ("full", "gradient", 1), ("full", "gradient", 4),
                                         ("scalar", "parameter", 1)):
            torch.manual_seed(0)
            pairs = [(torch.nn.Parameter(torch.randn(r, m) * 0.02), torch.nn.Parameter(torch.randn(n, r) * 0.02))
                     for m, n in SHAPES_7B.values()]
            params = [t for pair in pairs for t in pair]
            opt = bnb.optim.AdamW8bit(params, lr=1e-4) if opt_name.startswith("bnb") else torch.optim.AdamW(params, lr=1e-4)
            handle = reflora.attach(opt, pairs, variant=variant, space=space, interval=interval)
            for _ in range(steps):
                for t in params:
                    t.grad = torch.randn_like(t) * 1e-3
                opt.step()
            persistent = tensor_bytes(handle, {id(t) for t in params} | {id(opt)})
            elements = sum(t.numel() for t in params)
            biggest = max(r * (m + n) for m, n in SHAPES_7B.values())
            moments = 2
            rows.append({
                "optimizer": opt_name, "mode": f"{variant}, {space}" + (f", interval={interval}" if interval > 1 else ""),
                "persistent_per_pair_B": persistent / len(pairs), "state_per_pair_B": state_bytes(opt, params) / len(pairs),
                "lora_elements_per_pair": elements / len(pairs),
                "scratch_peak_B": 4 * biggest * (moments + 3) if space == "parameter" else 0,
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(one_run(args.one, args.steps, args.device)))
        return
    print(f"## Peak memory of a QLoRA step (nf4 Llama 4x512, r=16 all-linear, PagedAdamW8bit, {args.steps} steps, "
          f"{args.device}; a fresh process each)\n")
    print("| configuration | peak RSS (MiB) | RSS before the steps (MiB) | optimizer state (MiB) | RefLoRA persistent (KiB) |"
          + (" cuda max allocated (MiB) |" if args.device == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for config in CONFIGS:
        res = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(args.steps), "--device",
                              args.device], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            print(f"| {config} | failed: {res.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {config} | {row['peak_rss_mib']:.0f} | {row['rss_before_steps_mib']:.0f} | {row['opt_state_mib']:.2f} | "
              f"{row.get('reflora_persistent_kib', 0):.1f} |"
              + (f" {row['cuda_max_allocated_mib']:.0f} |" if args.device == "cuda" else ""), flush=True)

    rows = per_pair_7b(args.steps)
    print("\n## What RefLoRA keeps per pair at LLaMA-7B LoRA shapes (r=16, one pair of each of the 7 shapes, measured),"
          " scaled to 32 layers x 7 = 224 pairs\n")
    print("| optimizer | mode | RefLoRA persistent / pair (B) | optimizer state / pair (B) | ratio | 224 pairs: RefLoRA (KiB)"
          " | 224 pairs: optimizer state (MiB) | transport scratch, peak (MiB, computed) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["persistent_per_pair_B"] / row["state_per_pair_B"]
        print(f"| {row['optimizer']} | {row['mode']} | {row['persistent_per_pair_B']:.0f} | {row['state_per_pair_B']:.0f} | "
              f"{100 * ratio:.3f}% | {224 * row['persistent_per_pair_B'] / 1024:.1f} | "
              f"{224 * row['state_per_pair_B'] / 2**20:.1f} | {row['scratch_peak_B'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
