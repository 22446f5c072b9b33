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

Every scenario attaches with ``warmup_steps=0``: they run a few steps each and test the step's
mechanics from step 1 (the default waits 3 steps where the resolution gate is on).

Results go to ``$REFLORA_OUT/rank<k>.pt``; the test module asserts on them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import peft  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import reflora  # noqa: E402
from reflora.adapters import find_pairs  # noqa: E402

import reflora.step as reflora_step  # noqa: E402 (the step core: where the kernels are called)

RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
OUT = Path(os.environ.get("REFLORA_OUT", "."))
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64
LR_ADAMW = 3e-3


# ----------------------------------------------------------------------------- model and data


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    # init_lora_weights=False: B random as well, so every direction of every pair is live from step 1
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(model, lcfg)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def my_rows(ids: torch.Tensor) -> torch.Tensor:
    per = GLOBAL_BATCH // WORLD
    return ids[RANK * per:(RANK + 1) * per]


def layers(model: nn.Module):
    return model.base_model.model.model.layers


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LR_ADAMW, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    raise ValueError(name)


# ----------------------------------------------------------------------------- explicit reference


def _sqrtm(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, V = torch.linalg.eigh(0.5 * (M + M.mT))
    w = w.clamp_min(0.0)
    return (V * w.sqrt()) @ V.mT, (V * w.rsqrt()) @ V.mT


def ref_transform(A, B, variant: str, frame: str):
    """``(S, S^-1, left, right)`` of one pair in float64, from the closed form:
    ``S = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}`` (the geometric mean ``X^{-1} # Y``),
    ``left = P^T``, ``right = P^{-T}`` with ``P = S^{1/2}`` (symmetric frame) or ``S^{1/2} V``
    (paper frame: ``V`` the eigenvectors of ``S^{-1/2} Y S^{-1/2}`` in descending order, with the
    documented tie-breaker (docs/theory.md), each column's largest entry positive). Scalar variant: ``p = sqrt(||B|| / ||A||)``."""
    A, B = A.double(), B.double()
    if variant == "scalar":
        p = (B.norm() / A.norm()).sqrt()
        return p**2, p**-2, p, 1 / p
    X, Y = A @ A.mT, B.mT @ B
    Xh, Xih = _sqrtm(X)
    S = Xih @ _sqrtm(Xh @ Y @ Xh)[0] @ Xih
    Sh, Sih = _sqrtm(S)
    left, right = Sh, Sih
    if frame == "paper":
        G = Sih @ Y @ Sih
        # the documented rule (docs/theory.md): the exact eigenbasis of G where its eigenvalues
        # (the singular values sigma of B A) are apart by max(1e-4, 1e-6 c) of their mean,
        # c = cond(X) sigma_max / sigma_min; else the tie-breaker delta * diag(r-1, ..., 0) with
        # delta = max(1e-7, 1e-8 cond(S)) * mean(diag G); then each column of right = P^{-T} has
        # its largest entry positive
        sig = torch.linalg.eigvalsh(G).clamp_min(0)
        lam = torch.linalg.eigvalsh(X)
        c = float(lam.max() / lam.min() * sig.max() / sig.min())
        separated = float(sig.diff().min()) >= min(max(1e-4, 1e-6 * c), 1.0) * float(sig.mean())
        s = torch.linalg.eigvalsh(S)
        delta = 0.0 if separated else min(max(1e-8 * float(s.max() / s.min()), 1e-7), 1e-3) * float(G.diagonal().mean())
        G = G + torch.diag(delta * torch.arange(G.shape[0] - 1, -1, -1, dtype=G.dtype))
        _, V = torch.linalg.eigh(-0.5 * (G + G.mT))
        left, right = V.mT @ Sh, Sih @ V
        idx = right.abs().argmax(0)
        sign = torch.sign(right[idx, torch.arange(right.shape[1])])
        left, right = sign[:, None] * left, right * sign
    return S, torch.linalg.inv(S), left, right


def _lmul(T, x):
    return (T * x.double() if T.dim() == 0 else T @ x.double()).float()


def _rmul(x, T):
    return (x.double() * T if T.dim() == 0 else x.double() @ T).float()


def ref_reflora(A, B, gA, gB, state, variant: str, space: str, frame: str):
    """One RefLoRA step before the optimizer's: returns new ``(A, B, gA, gB)`` and updates ``state``
    (``{"exp_avg": (mA, mB), "exp_avg_sq": (vA, vB)}`` or ``{"momentum": (bA, bB)}``) in place."""
    S, S_inv, left, right = ref_transform(A, B, variant, frame)
    if space == "gradient":
        return A, B, _lmul(S_inv, gA), _rmul(gB, S)
    sq = (lambda T: T * T)
    rT, lT = right.mT if right.dim() else right, left.mT if left.dim() else left
    for key, (sA, sB) in list(state.items()):
        if key == "exp_avg_sq":
            state[key] = (_lmul(sq(rT), sA), _rmul(sB, sq(lT)))
        else:
            state[key] = (_lmul(rT, sA), _rmul(sB, lT))
    return _lmul(left, A), _rmul(B, right), _lmul(rT, gA), _rmul(gB, lT)


class RefOptimizer:
    """AdamW (torch's formula, weight_decay 0) or SGD with momentum 0.9, on a list of tensors."""

    def __init__(self, name: str):
        self.name, self.t = name, 0

    def step(self, params, grads, states):
        self.t += 1
        for p, g, st in zip(params, grads, states):
            if self.name == "adamw":
                lr, b1, b2, eps = LR_ADAMW, 0.9, 0.999, 1e-8
                m, v = st.setdefault("exp_avg", torch.zeros_like(p)), st.setdefault("exp_avg_sq", torch.zeros_like(p))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))
            else:
                lr, mu = 0.5, 0.9
                if "momentum" not in st:
                    st["momentum"] = g.clone()
                else:
                    st["momentum"].mul_(mu).add_(g)
                p.add_(st["momentum"], alpha=-lr)


def pair_states(states_A, states_B):
    keys = states_A.keys()
    return {k: (states_A[k], states_B[k]) for k in keys}


def reference_run(variant, space, opt_name, steps, frame, reflora_on=True):
    """The single-process reference trajectory: ``{pair name: [B @ A after step k]}``."""
    model = build_model(0)
    pairs = find_pairs(model)
    opt = RefOptimizer(opt_name)
    st = {p.name: ({}, {}) for p in pairs}
    traj = {p.name: [] for p in pairs}
    for step in range(steps):
        ids = batch(step)
        for p in pairs:
            p.A.grad = p.B.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        params, grads, states = [], [], []
        with torch.no_grad():
            for p in pairs:
                A, B, gA, gB = p.A.detach().clone(), p.B.detach().clone(), p.A.grad.clone(), p.B.grad.clone()
                sA, sB = st[p.name]
                if reflora_on:
                    moved = pair_states(sA, sB)
                    A, B, gA, gB = ref_reflora(A, B, gA, gB, moved, variant, space, frame)
                    for k, (a, b) in moved.items():
                        sA[k], sB[k] = a, b
                p.A.copy_(A)
                p.B.copy_(B)
                params += [p.A.data, p.B.data]
                grads += [gA, gB]
                states += [sA, sB]
            opt.step(params, grads, states)
            for p in pairs:
                traj[p.name].append((p.B @ p.A).clone())
    return traj


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- distributed side


def init() -> None:
    if WORLD > 1 or os.environ.get("REFLORA_FORCE_PG"):
        dist.init_process_group("gloo", init_method="file://" + os.environ["REFLORA_STORE"], rank=RANK,
                                world_size=WORLD)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor, as a copy (a plain tensor would otherwise be changed by the next step)."""
    if t is None:
        return None
    return t.full_tensor() if reflora.distributed.is_dtensor(t) else t.detach().clone()


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


# ----------------------------------------------------------------------------- DeepSpeed ZeRO


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


# ----------------------------------------------------------------------------- conv LoRA under FSDP2


def _regression_steps(model, opt, handle, steps: int, seed: int, x_shape: tuple, y_shape: tuple, sharded: bool):
    """``steps`` steps of a squared-error fit to random targets (batch ``seed + t`` of the global
    batch; this rank's rows of it when ``sharded``); every pair's whole ``B A`` (factors flattened
    past their first dimension) after each step."""
    products = []
    for t in range(steps):
        g = torch.Generator().manual_seed(seed + t)
        x, y = torch.randn(GLOBAL_BATCH, *x_shape, generator=g), torch.randn(GLOBAL_BATCH, *y_shape, generator=g)
        if sharded:
            x, y = my_rows(x), my_rows(y)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        pairs = handle.pairs if handle else find_pairs(model)
        products.append([full(p.B.detach()).flatten(1) @ full(p.A.detach()).flatten(1) for p in pairs])
    return products


def build_conv(seed: int = 0) -> nn.Module:
    """A small CNN with PEFT LoRA on its two 3x3 convolutions (A: (r, 8, 3, 3), B: (8, r, 1, 1))."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(net, lcfg)


def conv_run(variant: str | None, space: str, opt_name: str, steps: int, sharded: bool) -> dict:
    """Train the CNN for ``steps`` steps of ``opt_name`` (RefLoRA in ``(variant, space)``, or none), under
    FSDP2 with :func:`reflora.distributed.lora_shard_placement` on this rank's slice of the global
    batch, or in one process on the whole batch; every pair's whole ``B A`` after each step."""
    from torch.distributed.fsdp import fully_shard

    model = build_conv()
    convs = [model.base_model.model[0], model.base_model.model[2]]
    placements = {}
    if sharded:
        place = reflora.distributed.lora_shard_placement(model)
        for conv in convs:
            fully_shard(conv, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        placements = {n: str(p.placements) for n, p in model.named_parameters() if "lora_" in n}
    opt = make_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad])
    handle = reflora.attach(opt, model, variant=variant, space=space, warmup_steps=0) if variant else None
    products = _regression_steps(model, opt, handle, steps, 2000, (8, 6, 6), (8, 6, 6), sharded)
    return {"products": products, "placements": placements, "pairs": len(products[0]),
            "layouts": [p.layout for p in find_pairs(model)]}


def _against_one_process(run, args) -> list[dict]:
    """Every mode of ``args["modes"]`` trained by ``run(variant, space, opt_name, steps, sharded)``
    sharded on every rank, and on rank 0 also in one process on the whole batch, with RefLoRA and
    without: ``traj_error`` (sharded against one process, over every step) and ``effect`` (RefLoRA
    against the bare optimizer, last step)."""
    init()
    out = []
    for variant, space, opt_name in args["modes"]:
        res = run(variant, space, opt_name, args["steps"], sharded=True)
        if RANK == 0:  # one process on the whole batch: the same training, RefLoRA and without
            one = run(variant, space, opt_name, args["steps"], sharded=False)
            bare = run(None, space, opt_name, args["steps"], sharded=False)
            last = len(one["products"]) - 1
            res["traj_error"] = max(rel(a, b) for k in range(last + 1) for a, b in zip(res["products"][k], one["products"][k]))
            res["effect"] = max(rel(a, b) for a, b in zip(one["products"][last], bare["products"][last]))
        res.pop("products")
        out.append(res)
    return out


def scenario_conv(args):
    """Conv LoRA under FSDP2 in every mode against the library in one process on the whole batch."""
    return _against_one_process(conv_run, args)


def build_qlora(seed: int = 0) -> nn.Module:
    """Two bitsandbytes nf4 ``Linear4bit`` layers (float32 quant storage, float32 compute) with PEFT
    LoRA (r = 4) on both: the QLoRA layer stack, small."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = [nn.Linear(16, 32), nn.Linear(32, 8)]
    layers_ = []
    for lin in dense:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                              quant_storage=torch.float32)
        q.load_state_dict(lin.state_dict())
        layers_.append(q.to("cpu"))  # quantizes the weight
    net = nn.Sequential(layers_[0], nn.Tanh(), layers_[1])
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(net, lcfg)


def qlora_run(variant: str | None, space: str, opt_name: str, steps: int, sharded: bool) -> dict:
    """Train the 4-bit stack ``steps`` steps under FSDP2's default placement (``lora_A`` split along
    ``r``) on this rank's slice of the global batch, or in one process on the whole batch; every
    pair's whole ``B A`` after each step, and the 4-bit weights' bytes before and after."""
    from torch.distributed.fsdp import fully_shard

    model = build_qlora()
    blocks = [model.base_model.model[0], model.base_model.model[2]]
    base_before = [full(b.base_layer.weight.detach()).clone() for b in blocks]
    kinds = {}
    if sharded:
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        kinds = {n: f"{type(p).__name__} {getattr(p, 'placements', '')}" for n, p in model.named_parameters()}
    opt = make_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad])
    handle = reflora.attach(opt, model, variant=variant, space=space, warmup_steps=0) if variant else None
    products = _regression_steps(model, opt, handle, steps, 3000, (16,), (8,), sharded)
    base_after = [full(b.base_layer.weight.detach()) for b in blocks]
    return {"products": products, "kinds": kinds, "pairs": len(products[0]),
            "base_untouched": all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(base_before, base_after)),
            "quantized": all(type(b.base_layer.weight).__name__ in ("Params4bit", "DTensor") for b in blocks)}


def scenario_qlora(args):
    """QLoRA (nf4 base) under FSDP2's default placement in every mode against one process."""
    return _against_one_process(qlora_run, args)


SCENARIOS = {"train": scenario_train, "dcp": scenario_dcp, "placements": scenario_placements, "deepspeed": scenario_deepspeed,
             "conv": scenario_conv, "qlora": scenario_qlora}


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
