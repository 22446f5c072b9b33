"""The DeepSpeed ZeRO scenario of distributed_worker.py (``deepspeed``)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import reflora
from reflora.adapters import find_pairs

from dist_common import GLOBAL_BATCH, RANK, WORLD, batch, build_model, init, make_optimizer, my_rows, reference_run, rel



def scenario_deepspeed(args):
    """DeepSpeed ZeRO on CPU (gloo), for every ``{"stage", "ga", "modes"}`` in ``args["configs"]``:
    every mode against the explicit single-process reference on the whole batch (``ga``
    micro-batches of ``GLOBAL_BATCH / (WORLD * ga)`` per rank and step); modes that ZeRO cannot run
    record the error ``attach`` raised."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init()
    import deepspeed  # noqa: F401
    import deepspeed.comm.torch as ds_comm

    # its shared-memory all-reduce serves inference only; skipping it saves a C++ JIT build
    ds_comm.build_shm_op = lambda: None
    return [deepspeed_mode(cfg["stage"], cfg.get("ga", 1), mode, args["steps"])
            for cfg in args["configs"] for mode in cfg["modes"]]


def deepspeed_mode(stage, ga, mode, steps):
    import deepspeed

    variant, space, opt_name = mode
    model = build_model(0)
    opt = make_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad])
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // (WORLD * ga), "gradient_accumulation_steps": ga,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    res = {"mode": f"{variant}/{space}/{opt_name}", "stage": stage, "ga": ga, "wrapper": type(ds_opt).__name__}
    try:
        handle = reflora.attach(ds_opt, model, variant=variant, space=space, warmup_steps=0)
    except reflora.UnsupportedOptimizerError as e:
        res["attach_error"] = str(e)
        return res
    pairs = find_pairs(model)
    traj = {p.name: [] for p in pairs}
    reflora.distributed.comm_stats().reset()
    for step in range(steps):
        rows = my_rows(batch(step))
        for micro in rows.chunk(ga):
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        for p in pairs:
            traj[p.name].append((p.B @ p.A).detach().clone())
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, {n: t[-1] for n, t in traj.items()})
    res.update(step_count=handle.step_count, handle=type(handle).__name__, strategy=type(handle.strategy).__name__,
               deepspeed_optimizer=handle.strategy.deepspeed_optimizer is ds_opt, space=handle.space,
               reflora_calls=reflora.distributed.comm_stats().calls,
               products_identical=all(torch.equal(e[n], everyone[0][n]) for e in everyone for n in e))
    if RANK == 0:
        ref = reference_run(variant, handle.space, opt_name, steps, "paper")  # space="auto" resolved
        plain = reference_run(variant, handle.space, opt_name, steps, "paper", reflora_on=False)
        res["traj_error"] = max(rel(traj[n][k], ref[n][k]) for n in traj for k in range(steps))
        res["effect"] = max(rel(plain[n][k], ref[n][k]) for n in traj for k in range(steps))
    handle.remove()
    return res
