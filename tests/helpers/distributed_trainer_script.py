"""transformers.Trainer + RefLoRACallback on several CPU processes (run by torchrun or accelerate launch).

Started by tests/distributed/test_distributed_trainer.py (not a test module):

    torchrun --standalone --nproc-per-node 2 tests/helpers/distributed_trainer_script.py OUT.json --backend ddp ...
    accelerate launch --config_file CFG tests/helpers/distributed_trainer_script.py OUT.json --backend fsdp2 ...

Trains a PEFT Llama built from a config with checkpoints every 3 steps; with --modes it trains
each listed mode in turn without checkpoints (OUT.<i>: one Trainer per mode in one launch); with --resume-from it
continues from one of them, with --then-resume it then builds model, Trainer and callback anew
in the same processes and resumes from checkpoint-3 (OUT.resumed). Rank 0 writes the losses, the trained LoRA factors (gathered whole,
after training) and what it saw of the sharding to OUT.json / OUT.pt.

With ``--runs JSON`` (a list of argument lists, each one run's OUT and options as above) one launch
runs them all in turn, so that the processes and their imports are paid once; a run that raises
writes ``{"error": traceback}`` to its OUT and the next one starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import peft  # noqa: E402
import transformers  # noqa: E402

import reflora  # noqa: E402
from reflora.integrations.transformers import RefLoRACallback  # noqa: E402


def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def data(n=48, seq=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (n, seq), generator=g)]


_GATE = {"patched": False, "lifted": False}


def enable_fsdp_on_cpu(lifted: bool = True) -> None:
    """accelerate (1.15) turns its FSDP plugin on only for GPU-like backends: on CPU processes
    (``DistributedType.MULTI_CPU``) a Trainer given an FSDP config silently trains under DDP.
    This lifts that one gate (or, with ``lifted=False``, puts it back for the runs that follow),
    so that Trainer's FSDP2 path (``fully_shard`` by accelerate, its sharded checkpoints and
    resume) runs on gloo here; nothing else of accelerate is changed. Every Trainer builds its
    accelerator state anew (TrainingArguments resets it), so the flag holds per run."""
    _GATE["lifted"] = lifted
    if _GATE["patched"]:
        return
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if _GATE["lifted"] and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched
    _GATE["patched"] = True


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", help="where rank 0 writes its results (unused with --runs)")
    ap.add_argument("--backend", choices=["ddp", "fsdp2", "single"], default="ddp")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--space", default="gradient")
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--resume-from", default=None)
    ap.add_argument("--then-resume", action="store_true",
                    help="after training, build everything anew and resume from checkpoint-3 (OUT.resumed)")
    ap.add_argument("--run-dir", default=None, help="Trainer's output_dir (unused with --runs)")
    ap.add_argument("--cpu-fsdp-gate", action="store_true",
                    help="lift accelerate's GPU-only gate on its FSDP plugin (see enable_fsdp_on_cpu)")
    ap.add_argument("--preshard", action="store_true",
                    help="fully_shard the model with reflora.distributed.lora_shard_placement before Trainer")
    ap.add_argument("--modes", default=None,
                    help="comma-separated variant/space: train each in turn (OUT.<i>), no checkpoints")
    ap.add_argument("--float64", action="store_true", help="train in float64 (equivalence to round-off)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    ap.add_argument("--runs", default=None,
                    help="JSON list of argument lists (OUT and options, as above): run each in turn in this launch")
    return ap


def main() -> None:
    ap = parser()
    a = ap.parse_args()
    if a.runs is None:
        run(a, ap)
    else:
        for argv in json.loads(a.runs):
            one = ap.parse_args(argv)
            if one.runs is not None:
                ap.error("--runs: a run's arguments cannot hold --runs")
            try:
                run(one, ap)
            except Exception:
                if int(os.environ.get("RANK", "0")) == 0:
                    with open(one.out, "w") as fh:
                        json.dump({"error": traceback.format_exc()}, fh)
    import torch.distributed as dist

    # a Trainer sits in reference cycles, so its DDP / FSDP wrapper (holding gloo work objects)
    # would otherwise be freed during interpreter shutdown, where gloo's threads can abort the
    # process ("terminate called without an active exception"): free it while Python is alive
    gc.collect()
    if dist.is_initialized():
        # the same for the process group: close it
        dist.barrier()
        dist.destroy_process_group()


def run(a: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    if a.out is None or a.run_dir is None:
        ap.error("each run needs OUT and --run-dir")
    enable_fsdp_on_cpu(a.cpu_fsdp_gate)
    if a.modes:
        for i, mode in enumerate(a.modes.split(",")):
            a.variant, a.space = mode.split("/")
            train(a, None, f"{a.out}.{i}")
    else:
        train(a, a.resume_from, a.out)
    if a.then_resume:
        train(a, os.path.join(a.run_dir, "checkpoint-3"), a.out + ".resumed")
    gc.collect()  # this run's Trainers, before the next run builds its own


def train(a, resume_from: str | None, out: str) -> None:
    kw = {}
    if a.backend == "fsdp2":
        cfg = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
        # a model sharded before Trainer: accelerate keeps it as it is, nothing left to wrap
        cfg.update({"auto_wrap_policy": "NO_WRAP"} if a.preshard else {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
        kw = dict(fsdp=True, fsdp_config=cfg)
    if a.modes:
        # every process reads its slice of one sequential stream: 2 processes x 2 sequences see the
        # same global batches as 1 process x 4; nothing saved
        kw.update(train_sampling_strategy="sequential", save_strategy="no")
    args = transformers.TrainingArguments(
        output_dir=a.run_dir, max_steps=a.max_steps, per_device_train_batch_size=a.batch, learning_rate=5e-3,
        save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, max_grad_norm=1.0, save_only_model=False,
        ddp_backend=None if a.backend == "single" else "gloo", **kw,
    )
    m = model()
    if a.float64:
        m = m.double()
    if a.preshard:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        place = reflora.distributed.lora_shard_placement(m)
        for layer in m.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(m, shard_placement_fn=place)
    cb = RefLoRACallback(variant=a.variant, space=a.space, interval=a.interval)
    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cb.handle is not None:
                p = cb.handle.pairs[0]
                seen.update(sharded=type(p).__name__, placements=str(getattr(p.A, "placements", None)),
                            world=int(os.environ.get("WORLD_SIZE", "1")), step_count=cb.handle.step_count)

    trainer = transformers.Trainer(model=m, args=args, train_dataset=data(), callbacks=[cb, Probe()])
    trainer.train(resume_from_checkpoint=resume_from)
    factors = {}
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            factors[reflora.pairs.canonical_name(n)] = (
                p.full_tensor() if reflora.distributed.is_dtensor(p) else p).detach().clone()
    rank = int(os.environ.get("RANK", "0"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if rank == 0:
        torch.save(factors, out + ".pt")
        with open(out, "w") as fh:
            json.dump({"losses": losses, "global_step": trainer.state.global_step, "seen": seen}, fh)


if __name__ == "__main__":
    main()
