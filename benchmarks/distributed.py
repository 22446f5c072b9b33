"""RefLoRA's cost under FSDP2 and DDP: hook time and bytes communicated per step, every mode,
against the bare FSDP2 / DDP step, on N CPU processes (gloo); then how the communication grows
with the world size, computed for 8 to 1024 ranks from the per-rank figures measured here.

FSDP2 runs twice: ``fsdp2`` shards the model with ``reflora.distributed.lora_shard_placement``
(``lora_A`` along ``m``), ``fsdp2-s0`` with FSDP2's default ``Shard(0)`` for every parameter, as
Trainer's ``fsdp_config`` and ``accelerate launch`` do (``lora_A`` split along its rank dimension:
the full variant gathers it, its gradient and its state for the step, see ``reflora.reshard``).

    python benchmarks/distributed.py                       # 2 processes, PEFT Llama from a config
    python benchmarks/distributed.py --hidden 512 --layers 8 --rank 16 --steps 20

What is measured, per optimizer step, on every rank (the table shows the maximum over ranks):
* step: forward + backward + ``opt.step()`` (median over the timed steps);
* hook: RefLoRA's step pre-hook alone (timed by optimizer hooks registered around it);
* bytes: the payload handed to collectives during the step, per rank (a dispatch mode sees
  every c10d call: FSDP2's all-gathers and reduce-scatters, RefLoRA's all-reduce and
  redistributions, each shard handed to an all-gather counted once); DDP's
  bucketed all-reduce runs inside its C++ reducer, out of the dispatcher's sight, and is
  computed as the trainable gradients' bytes instead (marked *).

The design (reflora.distributed): per same-shape group of ``G`` pairs, one all-reduce of the
stacked partial Grams ``[X_1..X_G, Y_1..Y_G]`` in float64 (``2 G r^2 * 8`` bytes; scalar variant:
``2 G * 8``), whatever the world size; DDP's factors are replicated, so RefLoRA adds nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ["bare", "full/gradient", "full/parameter", "scalar/gradient", "scalar/parameter"]
BACKENDS = ["fsdp2", "fsdp2-s0", "ddp"]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (after 2 warm-up steps)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- one rank


def _worker(a) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import peft
    import transformers
    from torch.distributed.fsdp import fully_shard
    from torch.utils._python_dispatch import TorchDispatchMode

    import reflora

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["BENCH_STORE"], rank=rank, world_size=world)

    class CommBytes(TorchDispatchMode):
        """Sums, per kind of collective, the tensor payload this rank hands to c10d ops: all-gather
        its shard, reduce-scatter its whole buffer, all-reduce its tensor."""

        def __init__(self):
            super().__init__()
            self.bytes = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "other": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.replace("_", "")
            # (collectives only: not the functional ops' wait_tensor / _wrap_tensor_autograd bookkeeping)
            if func.namespace in ("c10d", "_c10d_functional") and any(
                    k in name for k in ("gather", "scatter", "reduce", "alltoall", "broadcast", "send", "recv")):
                kind = ("all_gather" if "allgather" in name else "reduce_scatter" if "reducescatter" in name
                        else "all_reduce" if "allreduce" in name else "other")
                # c10d ops take (outputs, inputs, ...), the functional ones (input, ...): the input
                functional = func.namespace == "_c10d_functional"
                src = args[1] if kind in ("all_gather", "reduce_scatter") and len(args) > 1 and not functional else args[0]
                stack = [src]
                while stack:
                    t = stack.pop()
                    if isinstance(t, (list, tuple)):
                        stack.extend(t)
                    elif isinstance(t, torch.Tensor):
                        self.bytes[kind] += t.numel() * t.element_size()
            return func(*args, **(kwargs or {}))

    def model():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=a.inter,
                                       num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                       num_key_value_heads=a.heads, max_position_embeddings=a.seq)
        m = transformers.LlamaForCausalLM(cfg)
        return peft.get_peft_model(m, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules="all-linear",
                                                      init_lora_weights=False))

    results = []
    for backend in BACKENDS:
        for mode in MODES:
            m = model()
            if backend.startswith("fsdp2"):
                # fsdp2-s0: FSDP2's default placement, Shard(0) for every parameter (Trainer, accelerate)
                place = reflora.distributed.lora_shard_placement(m) if backend == "fsdp2" else None
                for layer in m.base_model.model.model.layers:
                    fully_shard(layer, shard_placement_fn=place)
                fully_shard(m, shard_placement_fn=place)
                run = m
            else:
                run = torch.nn.parallel.DistributedDataParallel(m)
            trainable = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-3)
            marks = {}
            opt.register_step_pre_hook(lambda *_: marks.__setitem__("t0", time.perf_counter()))
            handle = None
            if mode != "bare":
                variant, space = mode.split("/")
                handle = reflora.attach(opt, m, variant=variant, space=space, warmup_steps=0)  # every step acts
            opt.register_step_pre_hook(lambda *_: marks.__setitem__("t1", time.perf_counter()))
            steps, hooks, comm, ours, waits, moved = [], [], [], [], [], []
            g = torch.Generator().manual_seed(rank)
            for step in range(a.steps + 2):
                ids = torch.randint(0, 256, (a.batch, a.seq), generator=g)
                reflora.distributed.comm_stats().reset()
                counter = CommBytes()
                dist.barrier()
                t = time.perf_counter()
                with counter:
                    run(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                steps.append(time.perf_counter() - t)
                opt.zero_grad(set_to_none=True)
                hooks.append(marks["t1"] - marks["t0"])
                comm.append(counter.bytes)
                ours.append(reflora.distributed.comm_stats().bytes)
                waits.append(reflora.distributed.comm_stats().seconds)
                moved.append(reflora.distributed.comm_stats().redistributed)
            pairs = handle.pairs if handle is not None else reflora.adapters.find_pairs(m)
            groups = handle.num_groups if handle is not None else 0
            grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
            if handle is not None:
                handle.remove()
            results.append({
                "backend": backend, "mode": mode, "step_ms": 1e3 * statistics.median(steps[2:]),
                "hook_ms": 1e3 * statistics.median(hooks[2:]), "allreduce_ms": 1e3 * statistics.median(waits[2:]),
                "comm_bytes": {k: statistics.median(c[k] for c in comm[2:]) for k in comm[0]},
                "reflora_bytes": statistics.median(ours[2:]), "moved_bytes": statistics.median(moved[2:]),
                "groups": groups, "pairs": len(pairs),
                "grad_bytes": grad_bytes,
            })
            del run, m, opt
    with open(os.path.join(os.environ["BENCH_OUT"], f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def _launch(a, argv) -> list[list[dict]]:
    tmp = tempfile.mkdtemp(prefix="reflora-bench-dist-")
    procs, logs = [], []
    for rank in range(a.nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(a.nproc), BENCH_STORE=os.path.join(tmp, "store"),
                   BENCH_OUT=tmp, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        log = open(os.path.join(tmp, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(rank)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + a.timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise SystemExit(f"timed out after {a.timeout:.0f}s; logs in {tmp}")
    finally:
        for log in logs:
            log.close()
    if any(p.returncode for p in procs):
        bad = next(r for r, p in enumerate(procs) if p.returncode)
        raise SystemExit(f"rank {bad} failed:\n" + Path(tmp, f"rank{bad}.log").read_text()[-4000:])
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(a.nproc)]


def _mb(b: float) -> str:
    return f"{b / 2**20:.3f}MB" if b >= 2**16 else f"{b / 1024:.2f}KB"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parse(argv)
    if a.worker is not None:
        _worker(a)
        return 0
    import torch

    ranks = _launch(a, argv)
    rows = [
        {k: (max(r[i][k] for r in ranks) if k.endswith("_ms") else ranks[0][i][k]) for k in ranks[0][i]}
        for i in range(len(ranks[0]))
    ]
    first = rows[1]
    print(f"torch {torch.__version__}, {a.nproc} CPU processes (gloo), 1 thread each; PEFT Llama from a config: "
          f"{a.layers} layers, hidden {a.hidden}, MLP {a.inter}, LoRA r={a.rank} all-linear ({first['pairs']} pairs, "
          f"{first['groups']} same-shape groups); {a.batch}x{a.seq} tokens per rank; AdamW; medians of {a.steps} steps, "
          "max over ranks")
    print()
    head = (f"{'backend':8} {'mode':18} {'step':>9} {'hook':>9} {'in collectives':>14} {'hook/step':>9} "
            f"{'bytes/step/rank':>16} {'of which RefLoRA':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sharded = r["backend"].startswith("fsdp2")
        comm = sum(r["comm_bytes"].values()) if sharded else r["grad_bytes"] + r["reflora_bytes"]
        star = " " if sharded else "*"
        hook = "" if r["mode"] == "bare" else f"{r['hook_ms']:.2f}ms"
        wait = "" if r["mode"] == "bare" or r["backend"] == "ddp" else f"{r['allreduce_ms']:.2f}ms"
        share = "" if r["mode"] == "bare" else f"{100 * r['hook_ms'] / r['step_ms']:.2f}%"
        ours = "" if r["mode"] == "bare" else _mb(r["reflora_bytes"])
        print(f"{r['backend']:8} {r['mode']:18} {r['step_ms']:7.1f}ms {hook:>9} {wait:>14} {share:>9} {_mb(comm):>15}{star} "
              f"{ours:>17}")
    print("* DDP's all-reduce runs in its C++ reducer, unseen by the dispatcher: computed as the trainable "
          "gradients' bytes (RefLoRA adds none there: the factors are replicated)")
    print("fsdp2: sharded with lora_shard_placement (lora_A along m); fsdp2-s0: FSDP2's default Shard(0) "
          "(Trainer's fsdp_config, accelerate launch)")

    # FSDP2's default placement: what RefLoRA adds to FSDP2's own traffic in the same step (the
    # dispatch mode's total less RefLoRA's own count), Grams and redistributions apart
    def row(backend, mode):
        return next(r for r in rows if r["backend"] == backend and r["mode"] == mode)

    print()
    print("FSDP2's default Shard(0) (fsdp2-s0): RefLoRA's payload per rank and step against FSDP2's own in the same step")
    head = (f"{'mode':18} {'FSDP2 own':>11} {'RefLoRA Grams':>14} {'gathered':>14} {'RefLoRA/FSDP2':>14} "
            f"{'same, lora_shard_placement':>27}")
    print(head)
    print("-" * len(head))
    for mode in MODES[1:]:
        r, q = row("fsdp2-s0", mode), row("fsdp2", mode)
        own = sum(r["comm_bytes"].values()) - r["reflora_bytes"]
        own_q = sum(q["comm_bytes"].values()) - q["reflora_bytes"]
        print(f"{mode:18} {_mb(own):>11} {_mb(r['reflora_bytes'] - r['moved_bytes']):>14} {_mb(r['moved_bytes']):>14} "
              f"{100 * r['reflora_bytes'] / own:13.2f}% {100 * q['reflora_bytes'] / own_q:26.3f}%")
    print("gathered: lora_A and its gradient, and in parameter space its AdamW moments (Shard(0) -> Replicate, "
          "all shards in one all-gather); each rank's shard counted once (it receives W - 1 of them); keeping its "
          "own rows of the result afterwards is local")

    # Growth with the world size W, from the per-rank payloads measured at W0 ranks. Ring collectives:
    # an all-gather moves (W - 1)/W of the gathered size through each rank (the gathered size is the
    # measured shard x W0), a reduce-scatter (W - 1)/W of the buffer, an all-reduce 2 (W - 1)/W of it.
    fsdp = next(r for r in rows if r["backend"] == "fsdp2" and r["mode"] == "bare")["comm_bytes"]
    W0 = a.nproc
    payload = {m: next(r for r in rows if r["backend"] == "fsdp2" and r["mode"] == m)["reflora_bytes"]
               for m in ("full/gradient", "scalar/gradient")}
    groups = first["groups"]
    print()
    print("wire bytes per rank and step as the world size W grows (ring collectives, from the payloads measured above)")
    moved = row("fsdp2-s0", "full/parameter")["moved_bytes"]
    head = (f"{'ranks':>6} {'FSDP2 step':>12} {'RefLoRA full':>13} {'vs FSDP2':>9} {'RefLoRA scalar':>15} "
            f"{'DDP step':>10} {'RefLoRA ring latency steps':>27} {'full S(0)':>10} {'vs FSDP2':>9}")
    print(head)
    print("-" * len(head))
    for W in [8, 16, 32, 64, 128, 256, 512, 1024]:
        f = (W - 1) / W
        bare = f * (fsdp["all_gather"] * W0 + fsdp["reduce_scatter"])
        full, scalar = 2 * f * payload["full/gradient"], 2 * f * payload["scalar/gradient"]
        ddp = 2 * f * first["grad_bytes"]
        # the full variant under Shard(0), parameter space: the Grams' all-reduce plus the all-gathers,
        # (W - 1)/W of each gathered tensor (the measured shard payload x W0 is their whole size)
        a2a = full + f * moved * W0
        print(f"{W:>6} {_mb(bare):>12} {_mb(full):>13} {100 * full / bare:8.3f}% {_mb(scalar):>15} {_mb(ddp):>10} "
              f"{groups * 2 * (W - 1):>27} {_mb(a2a):>10} {100 * a2a / bare:8.3f}%")
    print(f"RefLoRA's payload does not depend on W: {_mb(payload['full/gradient'])} (full) and "
          f"{_mb(payload['scalar/gradient'])} (scalar) per rank and step, 2 G r^2 resp. 2 G float64 per group, in "
          f"{groups} all-reduces; ring wire bytes approach twice that, FSDP2's approach the gathered model plus the "
          "LoRA gradients; the latency of a ring all-reduce grows as 2 (W - 1) steps (log2 W for a tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
