"""One rank of a multi-process test (started by tests/helpers/distributed_launch.py; not a test module).

Scenarios (``python distributed_worker.py <scenario> <json args>``):

* ``train``: a PEFT Llama built from a config (``all-linear``, random ``A`` and ``B``) trained for a
  few steps under FSDP2 / HSDP / DDP with RefLoRA attached, every rank on its slice of one global
  batch; rank 0 then trains the same model in one process on the whole batch with an *explicit*
  reference (RefLoRA's math written out below in float64 from the closed form, and a hand-rolled
  AdamW / SGD), and compares. Each step is also checked on its own: the whole factors, gradients
  and optimizer state are gathered before ``opt.step()`` (by the test, outside the hook), the
  reference step is applied to them, and the result is compared with the gathered factors after.
* ``conv``: PEFT LoRA on ``Conv2d`` (4-D factors, the ``flatten`` layout) under FSDP2 with
  :func:`reflora.distributed.lora_shard_placement`, every mode, against the library in one
  process on the whole batch (and, to show RefLoRA acted, against the bare optimizer).
* ``dcp``: save model, optimizer and handle with ``torch.distributed.checkpoint`` mid-run, keep
  training (the uninterrupted run), then rebuild everything, load, train on and compare. With
  ``world_size == 1`` it loads a checkpoint written by 2 processes into a plain (unsharded) model.

The scenarios live in dist_fsdp.py (``train``, ``dcp``, ``placements``), dist_layers.py (``conv``,
``qlora``) and dist_deepspeed.py (``deepspeed``), on dist_common.py's model, data and reference.
``many`` runs several scenarios in one launch (``{"runs": [[scenario, args], ...]}``): the
processes, their imports and the reference runs are paid once; an exception in one part is
returned as its result (``{"error": traceback}``) and the others go on.

Every scenario attaches with ``warmup_steps=0``: they run a few steps each and test the step's
mechanics from step 1 (the default waits 3 steps where the resolution gate is on).

Results go to ``$REFLORA_OUT/rank<k>.pt``; the test module asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import reflora

from dist_common import OUT, RANK
from dist_deepspeed import scenario_deepspeed
from dist_fsdp import scenario_dcp, scenario_placements, scenario_train
from dist_layers import scenario_conv, scenario_qlora


def scenario_many(args):
    out = []
    for scenario, part in args["runs"]:
        reflora.distributed.comm_stats().reset()
        try:
            out.append(SCENARIOS[scenario](part))
        except Exception:  # noqa: BLE001 - reported to the test that owns this part
            out.append({"error": traceback.format_exc()})
    return out


SCENARIOS = {"train": scenario_train, "dcp": scenario_dcp, "placements": scenario_placements, "deepspeed": scenario_deepspeed,
             "conv": scenario_conv, "qlora": scenario_qlora, "many": scenario_many}


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    result = SCENARIOS[scenario](args)
    torch.save(result, OUT / f"rank{RANK}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Everything is written: leave without the interpreter's teardown, where a native thread of a
    # library (gloo's, or one of the packages that transformers / peft now import, bitsandbytes and
    # torchao) can still be joinable and abort the process ("terminate called without an active
    # exception", seen once in about ten runs of the checkpoint scenario, after every rank had passed
    # the final barrier)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
