"""The FSDP2 / HSDP / DDP scenarios of distributed_worker.py: a PEFT Llama trained with RefLoRA
against the explicit reference (``train``), torch.distributed.checkpoint mid-run (``dcp``), and
hand-placed DTensor factors (``placements``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import reflora
import reflora.step as reflora_step  # (the step core: where the kernels are called)

from dist_common import (
    RANK,
    WORLD,
    RefOptimizer,
    batch,
    build_model,
    full,
    init,
    layers,
    make_optimizer,
    my_rows,
    ref_reflora,
    reference_run,
    rel,
)


def wrap(model: nn.Module, kind: str, placement: str, mp: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "single":
        return model
    mesh = None
    shard_size = WORLD
    if kind == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("replicate", "shard"))
        shard_size = WORLD // 2
    kw = {}
    if placement == "lora":
        kw["shard_placement_fn"] = reflora.distributed.lora_shard_placement(model, shard_size=shard_size)
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers(model):
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


class KernelRecorder:
    """Records every r x r kernel call's inputs and outputs (to compare them across ranks): the
    full variant's batched kernel (one call per rank r a step, all groups of that rank stacked)
    and the scalar variant's."""

    TARGETS = ((reflora_step, "group_kernel"), (reflora_step, "scalar_kernel"))

    def __init__(self):
        self.records = []
        self.saved = [(owner, n, getattr(owner, n)) for owner, n in self.TARGETS]
        for owner, n, fn in self.saved:
            setattr(owner, n, self._wrap(n, fn))

    def _wrap(self, name, fn):
        def inner(*args, **kw):
            out = fn(*args, **kw)
            self.records.append((name, [a.clone() for a in args if torch.is_tensor(a)], [o.clone() for o in out]))
            return out
        return inner

    def restore(self):
        for owner, n, fn in self.saved:
            setattr(owner, n, fn)


def gather_pairs(handle, opt):
    """Whole factors, gradients and optimizer state of every pair (collectives: every rank calls)."""
    out = {}
    for p in handle.pairs:
        st = {k: (full(opt.state[p.A][k]), full(opt.state[p.B][k]))
              for k in opt.state.get(p.A, {}) if k in ("exp_avg", "exp_avg_sq", "momentum_buffer")}
        if "momentum_buffer" in st:
            st["momentum"] = st.pop("momentum_buffer")
        out[p.name] = dict(A=full(p.A.detach()), B=full(p.B.detach()), gA=full(p.A.grad), gB=full(p.B.grad),
                           state=st, local=(tuple(reflora.distributed.local(p.A).shape),
                                            tuple(reflora.distributed.local(p.B).shape)))
    return out


def one_step_error(before, after, variant, space, frame, opt_name, t) -> float:
    """Apply the explicit reference step to the gathered pre-step tensors; compare with after."""
    worst = 0.0
    for name, b in before.items():
        st = {k: (v[0].clone(), v[1].clone()) for k, v in b["state"].items()}
        A, B, gA, gB = ref_reflora(b["A"].clone(), b["B"].clone(), b["gA"], b["gB"], st, variant, space, frame)
        opt = RefOptimizer(opt_name)
        opt.t = t - 1
        sA = {k: v[0] for k, v in st.items()}
        sB = {k: v[1] for k, v in st.items()}
        opt.step([A, B], [gA, gB], [sA, sB])
        worst = max(worst, rel(after[name]["A"], A), rel(after[name]["B"], B))
    return worst


def train_mode(kind, variant, space, opt_name, steps, placement, mp, frame):
    from torch.distributed.tensor.debug import CommDebugMode

    model = wrap(build_model(0), kind, placement, mp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(opt_name, params)
    result = {"mode": f"{variant}/{space}/{opt_name}", "kind": kind}
    recorder = KernelRecorder()  # before attach: the handle binds its kernel when it is built
    try:
        if variant == "none":  # the bare optimizer: the test's own baseline of FSDP vs one process
            handle = reflora.attach(opt, model, warmup_steps=10**9)
        else:
            handle = reflora.attach(opt, model, variant=variant, space=space, frame=frame, warmup_steps=0)
    except reflora.distributed.ShardingError as e:
        recorder.restore()
        result["attach_error"] = str(e)
        return result
    traj = {p.name: [] for p in handle.pairs}
    comm, step_err, local_ok = [], 0.0, True
    try:
        for step in range(steps):
            ids = my_rows(batch(step))
            model(input_ids=ids, labels=ids).loss.backward()
            before = gather_pairs(handle, opt)
            reflora.distributed.comm_stats().reset()
            with CommDebugMode() as cm:
                opt.step()
            stats = reflora.distributed.comm_stats()
            comm.append({"counts": {str(k): v for k, v in cm.get_comm_counts().items()},
                         "calls": stats.calls, "bytes": stats.bytes})
            opt.zero_grad(set_to_none=True)
            after = gather_pairs(handle, opt)
            local_ok &= all(after[n]["local"] == before[n]["local"] for n in before)
            if RANK == 0 and variant != "none":
                step_err = max(step_err, one_step_error(before, after, variant, space, frame, opt_name, step + 1))
            for n, a in after.items():
                traj[n].append(a["B"] @ a["A"])
    finally:
        recorder.restore()
    everyone = [None] * WORLD if dist.is_initialized() else None
    if everyone is not None:
        dist.all_gather_object(everyone, recorder.records)
        ranks_identical = all(
            len(r) == len(everyone[0]) and all(
                n0 == n1 and all(torch.equal(x, y) for x, y in zip(i0 + o0, i1 + o1))
                for (n0, i0, o0), (n1, i1, o1) in zip(r, everyone[0]))
            for r in everyone)
        factors = [None] * WORLD
        dist.all_gather_object(factors, {n: (t[-1]) for n, t in traj.items()})
        products_identical = all(all(torch.equal(f[n], factors[0][n]) for n in f) for f in factors)
    else:
        ranks_identical = products_identical = True
    local_factors = {p.name: (reflora.distributed.local(p.A).detach().clone(), reflora.distributed.local(p.B).detach().clone())
                     for p in handle.pairs}
    result.update(
        groups=handle.num_groups, pairs=len(handle.pairs), comm=comm, kernels=len(recorder.records),
        ranks_identical=ranks_identical, products_identical=products_identical, step_error=step_err,
        shard_local=local_ok, local_factors=local_factors,
        placements={p.name: (str(getattr(p.A, "placements", None)), str(getattr(p.B, "placements", None)))
                    for p in handle.pairs},
        dtypes={str(p.A.dtype) for p in handle.pairs}, rank_shape=(handle.pairs[0].rank, *handle.pairs[0].shape),
    )
    if RANK == 0:
        ref = reference_run(variant, space, opt_name, steps, frame, reflora_on=variant != "none")
        plain = reference_run(variant, space, opt_name, steps, frame, reflora_on=False)
        result["traj_errors"] = [max(rel(traj[n][k], ref[n][k]) for n in traj) for k in range(steps)]
        result["traj_error"] = max(result["traj_errors"])
        result["effect"] = max(rel(plain[n][k], ref[n][k]) for n in traj for k in range(steps))
    handle.remove()
    return result


def scenario_train(args):
    init()
    results = []
    for variant, space, opt_name in args["modes"]:
        results.append(train_mode(args.get("kind", "fsdp"), variant, space, opt_name, args.get("steps", 5),
                                  args.get("placement", "lora"), args.get("mp", False), args.get("frame", "paper")))
    return results


# ----------------------------------------------------------------------------- checkpoints


def scenario_dcp(args):
    """For every config: save at ``save_at``; with ``phase == "save"`` also train on to ``steps`` (the
    uninterrupted run) and resume in the same processes; ``phase == "load"`` (any world size)
    resumes from the checkpoint the save phase wrote."""
    init()
    return [dcp_config(args, i, cfg) for i, cfg in enumerate(args["configs"])]


def dcp_config(args, index, cfg):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = Path(args["ckpt"]) / f"config{index}"
    variant, space, interval = cfg["variant"], cfg["space"], cfg.get("interval", 1)
    steps, save_at = args["steps"], args["save_at"]

    def setup(seed):
        model = wrap(build_model(seed), "fsdp" if WORLD > 1 else "single", "lora", False)
        opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad])
        handle = reflora.attach(opt, model, variant=variant, space=space, interval=interval, warmup_steps=0)
        return model, opt, handle

    def train(model, opt, handle, start, stop):
        out = []
        for step in range(start, stop):
            ids = my_rows(batch(step))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append({p.name: full(p.B.detach()) @ full(p.A.detach()) for p in handle.pairs})
        return out

    def state(model, opt, handle):
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd, "reflora": handle.state_dict()}

    def load(model, opt, handle):
        sd = state(model, opt, handle)  # a fresh handle's state_dict is a complete template
        dcp.load(sd, checkpoint_id=str(root))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        handle.load_state_dict(sd["reflora"])
        return sd["reflora"]

    if args["phase"] == "save":
        model, opt, handle = setup(0)
        train(model, opt, handle, 0, save_at)
        dcp.save(state(model, opt, handle), checkpoint_id=str(root))
        uninterrupted = train(model, opt, handle, save_at, steps)
        if RANK == 0:
            torch.save(uninterrupted, root / "uninterrupted.pt")
        handle.remove()
        dist.barrier()
    else:
        uninterrupted = torch.load(root / "uninterrupted.pt", weights_only=False)
    model, opt, handle = setup(7)  # another init: everything must come from the checkpoint
    loaded = load(model, opt, handle)
    resumed = train(model, opt, handle, save_at, steps)
    handle.remove()
    return {
        "resumed_error": max(rel(r[n], u[n]) for r, u in zip(resumed, uninterrupted) for n in u),
        "loaded_step_count": loaded["step_count"], "loaded_cached": list(loaded.get("cached", [])),
        "step_count": handle.step_count,
    }


# ----------------------------------------------------------------------------- raw DTensor factors


def scenario_placements(args):
    """Raw factors distributed by hand (``distribute_tensor``) with the placements in ``args``:
    every mode, 3 AdamW steps, against the same steps on plain tensors in this process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    init()
    mesh = init_device_mesh("cpu", (WORLD,))
    parse = {"R": Replicate(), "S0": Shard(0), "S1": Shard(1)}
    out = []
    for case in args["cases"]:
        r, m, n = case["shape"]
        g = torch.Generator().manual_seed(3)
        A0, B0, T = torch.randn(r, m, generator=g), torch.randn(n, r, generator=g), torch.randn(n, m, generator=g)
        for variant, space in (("full", "gradient"), ("full", "parameter"), ("scalar", "gradient"), ("scalar", "parameter")):
            if variant == "full" and case.get("scalar_only"):
                continue
            runs = {}
            for sharded in (False, True):
                if sharded:
                    A = nn.Parameter(distribute_tensor(A0.clone(), mesh, [parse[case["A"]]]))
                    B = nn.Parameter(distribute_tensor(B0.clone(), mesh, [parse[case["B"]]]))
                else:
                    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
                whole = (lambda t: t.full_tensor()) if sharded else (lambda t: t)
                opt = torch.optim.AdamW([A, B], lr=1e-2)
                reflora.attach(opt, [(A, B)], variant=variant, space=space, warmup_steps=0)
                reflora.distributed.comm_stats().reset()
                for _ in range(3):
                    opt.zero_grad()
                    ((whole(B) @ whole(A)) - T).square().sum().backward()
                    opt.step()
                runs[sharded] = (whole(B) @ whole(A)).detach(), reflora.distributed.comm_stats().calls, \
                    tuple(reflora.distributed.local(A).shape)
            out.append({"case": case, "mode": f"{variant}/{space}", "error": rel(runs[True][0], runs[False][0]),
                        "calls": runs[True][1], "local_A": runs[True][2]})
    return out
