"""RefLoRA with FSDP2 (``torch.distributed.fsdp.fully_shard``) and a distributed checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp2.py --steps 20          # CPU (gloo) or GPUs (nccl)
    python examples/fsdp2.py --steps 5                                 # one process

A PEFT Llama built from a small config (nothing is downloaded), LoRA on every linear layer,
each decoder layer sharded with ``reflora.distributed.lora_shard_placement`` (``lora_A`` along
its input dimension, so that the full variant stays shard-local), bf16 compute with fp32
gradient reduction, RefLoRA attached to AdamW. Prints the loss and the bytes RefLoRA
communicated per step (nothing in the first three: the default waits three steps where its
resolution gate is on, docs/rank-deficient.md); ``--checkpoint DIR`` saves model, optimizer and
RefLoRA's state with ``torch.distributed.checkpoint`` at the end and loads them back.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import reflora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", default="full", choices=["full", "scalar"])
    ap.add_argument("--space", default="parameter", choices=["gradient", "parameter"])
    ap.add_argument("--checkpoint", default=None, help="save and reload a distributed checkpoint here")
    args = ap.parse_args()

    if "RANK" not in os.environ:  # plain `python examples/fsdp2.py`: a group of one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)  # the same initial model on every rank
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    place = reflora.distributed.lora_shard_placement(model)  # before sharding: it knows the parameters
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, shard_placement_fn=place, mp_policy=mp)
    fully_shard(model, shard_placement_fn=place, mp_policy=mp)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    handle = reflora.attach(opt, model, variant=args.variant, space=args.space)

    g = torch.Generator().manual_seed(rank)  # every rank its own batch
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        reflora.distributed.comm_stats().reset()
        opt.step()
        opt.zero_grad()
        sent = reflora.distributed.comm_stats()
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  RefLoRA: {sent.calls} all-reduce(s), {sent.bytes} bytes")

    if args.checkpoint:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd, "reflora": handle.state_dict()}, checkpoint_id=args.checkpoint)
        # resume (in a new run: the same model, optimizer and attach call first)
        state = {"model": msd, "optim": osd, "reflora": handle.state_dict()}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        handle.load_state_dict(state["reflora"])
        if rank == 0:
            print(f"checkpoint saved and loaded: {args.checkpoint} (RefLoRA step {handle.step_count})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
