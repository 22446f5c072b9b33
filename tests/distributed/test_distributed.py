"""Real multi-process runs (gloo, CPU): FSDP2, HSDP, DDP and torch.distributed.checkpoint.

Every test starts its own processes (tests/helpers/distributed_launch.py: a file rendezvous, a hard
timeout) running tests/helpers/distributed_worker.py, and compares them with an explicit single-process
reference computed there: RefLoRA's math written out from the closed form in float64 and a
hand-rolled AdamW / SGD on the whole global batch (not the library run in one process). Each
factor's ``B @ A`` must agree to 1e-5 (relative, float32) over 5 steps; the same distributed run
with the bare optimizer differs from one process by ~5e-7 on this model, RefLoRA changes ``B @ A``
by 5-40% against the bare optimizer (so a silent no-op fails).

The 2-process scenarios of this module run in one launch (the ``pooled`` fixture: the worker's
``many`` scenario), so that the processes, their imports and the single-process reference runs
are paid once; each test asserts on its own part, and a part that raised fails its test alone.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import importlib.util  # noqa: E402

from distributed_launch import launch  # noqa: E402

pytestmark = pytest.mark.distributed

MODES = [["full", "gradient", "adamw"], ["full", "parameter", "adamw"],
         ["scalar", "gradient", "sgd"], ["scalar", "parameter", "adamw"]]
R, PAIRS, GROUPS, STEPS = 4, 14, 4, 5  # the worker's PEFT Llama: 2 layers x 7 targets, 4 shapes


DCP_CONFIGS = [{"variant": "full", "space": "gradient", "interval": 2}, {"variant": "full", "space": "parameter"}]
DCP_ARGS = {"configs": DCP_CONFIGS, "steps": 6, "save_at": 3}
# hand-distributed factors on 2 ranks: replicated factors must be counted once in the sum,
# uneven shards (m = 5) and an empty one (m = 1: rank 1 holds no column of A) must work
PLACEMENT_CASES = [
    {"A": "S1", "B": "S0", "shape": [4, 12, 10], "calls": 1},
    {"A": "R", "B": "S0", "shape": [4, 12, 10], "calls": 1},
    {"A": "S1", "B": "R", "shape": [4, 12, 10], "calls": 1},
    {"A": "R", "B": "R", "shape": [4, 12, 10], "calls": 0},
    {"A": "S1", "B": "S0", "shape": [3, 5, 7], "calls": 1},
    {"A": "S1", "B": "S0", "shape": [1, 1, 6], "calls": 1},
    # a rank dimension sharded: the full variant gathers that factor for the step (and adds its Gram
    # once; both gathered: nothing left to all-reduce); uneven (r = 3) and empty (r = 1: rank 1
    # holds no row of A) shards
    {"A": "S0", "B": "S0", "shape": [4, 12, 10], "calls": 1, "moved": 1},
    {"A": "S0", "B": "S1", "shape": [4, 12, 10], "calls": 1, "moved": 2, "full_calls": 0},
    {"A": "S0", "B": "S0", "shape": [3, 5, 7], "calls": 1, "moved": 1},
    {"A": "S0", "B": "S0", "shape": [1, 6, 6], "calls": 1, "moved": 1},
]
DEFAULT_MODES = MODES + [["full", "parameter", "sgd"]]

# test -> (part, scenario, args, the part's own timeout in seconds): the pooled launch's timeout is
# the sum over the parts the session selected
POOL = {
    "test_fsdp2_conv_lora_matches_one_process_in_all_modes": ("conv", "conv", {"modes": MODES, "steps": 3}, 150),
    "test_fsdp2_qlora_nf4_base_default_placement_matches_one_process": (
        "qlora", "qlora", {"modes": MODES, "steps": 3}, 180),
    "test_fsdp2_matches_one_process_in_all_modes": (
        "fsdp", "train", {"kind": "fsdp", "modes": MODES, "steps": STEPS}, 150),
    "test_fsdp2_mixed_precision_bf16_params_fp32_reduce": ("mp", "train", {"modes": MODES, "steps": 3, "mp": True}, 150),
    "test_fsdp2_default_placement_all_modes_match_one_process": (
        "default", "train", {"modes": DEFAULT_MODES, "steps": STEPS, "placement": "default"}, 150),
    "test_ddp_matches_one_process_in_all_modes": ("ddp", "train", {"kind": "ddp", "modes": MODES, "steps": STEPS}, 150),
    "test_placements_replicated_uneven_and_empty_shards": ("placements", "placements", {"cases": PLACEMENT_CASES}, 120),
    "test_dcp_checkpoint_resumes_on_two_and_on_one_process": ("dcp", "dcp", dict(DCP_ARGS, phase="save"), 150),
}


@pytest.fixture(scope="module")
def pooled(request, tmp_path_factory) -> dict:
    """``{part: [rank 0's result, rank 1's result]}`` of one 2-process launch running the parts of
    the tests this session selected."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    parts = [v for k, v in POOL.items() if k in selected]
    if not importlib.util.find_spec("bitsandbytes"):
        parts = [p for p in parts if p[0] != "qlora"]
    ckpt = str(tmp_path_factory.mktemp("dcp"))
    runs = [[scenario, dict(args, ckpt=ckpt) if scenario == "dcp" else args] for _, scenario, args, _ in parts]
    ranks = launch("many", 2, {"runs": runs}, timeout=sum(t for *_, t in parts))
    out = {name: [rank[i] for rank in ranks] for i, (name, *_) in enumerate(parts)}
    out["ckpt"] = ckpt
    return out


def _part(pooled: dict, name: str) -> list:
    for res in pooled[name]:
        if isinstance(res, dict) and "error" in res:
            raise AssertionError(f"part {name!r} raised in the worker:\n{res['error']}")
    return pooled[name]


def _bytes_per_step(variant: str) -> int:
    # one float64 all-reduce per group of [X_1..X_G, Y_1..Y_G] (r x r each) or of the 2 G squared norms
    return 2 * PAIRS * (R * R if variant == "full" else 1) * 8


def _check_mode(results: list[dict], steps: int, reference: bool = True) -> None:
    r0 = results[0]
    variant = r0["mode"].split("/")[0]
    assert r0["groups"] == GROUPS and r0["pairs"] == PAIRS
    assert r0["kernels"] == steps  # one batched r x r kernel call per step: the 4 groups share r = 4
    for res in results:
        assert res["shard_local"]  # every rank keeps its own shard shapes
        for comm in res["comm"]:
            # the hook's only communication: one all-reduce per same-shape group, no gather
            assert comm["counts"] == {"c10d.allreduce_": GROUPS}, comm
            assert comm["calls"] == GROUPS and comm["bytes"] == _bytes_per_step(variant)
    assert all(res["ranks_identical"] for res in results)  # same r x r inputs and outputs, bitwise
    assert r0["step_error"] < 1e-5, r0  # each step vs the explicit step on the gathered tensors
    if reference:
        assert r0["traj_error"] < 1e-5, r0  # 5 steps vs one process on the whole batch
        assert r0["effect"] > 1e-2, r0  # RefLoRA did something the bare optimizer does not


def test_fsdp2_conv_lora_matches_one_process_in_all_modes(pooled) -> None:
    """PEFT LoRA on Conv2d: A (r, in, k, k) sharded along its input channels by
    lora_shard_placement, B (out, r, 1, 1) along its output channels; 3 steps in each mode agree
    with the same training in one process on the whole batch (SGD for RefLoRA-S in gradient space:
    under Adam a per-tensor gradient scale is all but invisible)."""
    runs = _part(pooled, "conv")
    modes = MODES
    for m, _ in enumerate(modes):
        r0 = runs[0][m]
        assert r0["pairs"] == 2 and r0["layouts"] == [("flatten", "flatten")] * 2
        assert {v for k, v in r0["placements"].items() if "lora_A" in k} == {"(Shard(dim=1),)"}
        assert {v for k, v in r0["placements"].items() if "lora_B" in k} == {"(Shard(dim=0),)"}
        assert r0["traj_error"] < 1e-5, (modes[m], r0)
        assert r0["effect"] > 1e-2, (modes[m], r0)


def test_fsdp2_qlora_nf4_base_default_placement_matches_one_process(pooled) -> None:
    """QLoRA under FSDP2 as Trainer / accelerate shard it: PEFT LoRA on bitsandbytes nf4
    ``Linear4bit`` layers (``quant_storage=float32``, which FSDP2 needs to shard the packed weight),
    FSDP2's default ``Shard(0)`` everywhere (``lora_A`` split along ``r``), every mode with 32-bit
    AdamW / SGD for 3 steps, against the same training in one process; the 4-bit weights stay
    bit for bit."""
    pytest.importorskip("bitsandbytes")
    runs = _part(pooled, "qlora")
    for m, mode in enumerate(MODES):
        for rank in runs:
            assert rank[m]["base_untouched"] and rank[m]["quantized"], (mode, rank[m])
        r0 = runs[0][m]
        assert r0["pairs"] == 2
        # FSDP2 shards the packed 4-bit weights too (bitsandbytes >= 0.50 keeps their quant state)
        assert {v for k, v in r0["kinds"].items() if "lora_A" in k or "base_layer.weight" in k} == {
            "DTensor (Shard(dim=0),)"}, r0["kinds"]
        assert r0["traj_error"] < 1e-5, (mode, r0)
        assert r0["effect"] > 1e-2, (mode, r0)


@pytest.mark.parametrize("kind", ["fsdp"])
def test_fsdp2_matches_one_process_in_all_modes(pooled, kind) -> None:
    runs = _part(pooled, kind)
    for m, mode in enumerate(MODES):
        per_rank = [r[m] for r in runs]
        assert per_rank[0]["mode"] == "/".join(mode)
        assert set(per_rank[0]["placements"].values()) == {("(Shard(dim=1),)", "(Shard(dim=0),)")}
        _check_mode(per_rank, STEPS)
        # whole factors are never gathered: each rank holds half of every A (along m) and B (along n)
        shards = per_rank[0]["local_factors"]["base_model.model.model.layers.0.mlp.down_proj.default"]
        assert shards[0].shape == (R, 32) and shards[1].shape == (16, R)  # A (4, 64), B (32, 4)


def test_fsdp2_mixed_precision_bf16_params_fp32_reduce(pooled) -> None:
    # bf16 forward/backward: the trajectory is not one process's float32 one, so each step is
    # checked on its own (the explicit step applied to the gathered fp32 shards, grads and state)
    runs = _part(pooled, "mp")
    for m in range(len(MODES)):
        per_rank = [r[m] for r in runs]
        assert per_rank[0]["dtypes"] == {"torch.float32"}  # FSDP2 keeps fp32 sharded parameters
        _check_mode(per_rank, 3, reference=False)
        assert per_rank[0]["traj_error"] < 5e-2  # near the float32 run: bf16 compute only


def test_fsdp2_default_placement_all_modes_match_one_process(pooled) -> None:
    # FSDP2's default Shard(0) splits lora_A (r, m) along r: the full variant steps on whole copies of
    # A, its gradient and (parameter space) its optimizer state, gathered before the step, and each
    # rank keeps its own rows of the result (reflora.reshard); the scalar variant uses the shards
    modes = DEFAULT_MODES
    runs = _part(pooled, "default")
    for m, (variant, space, opt) in enumerate(modes):
        per_rank = [r[m] for r in runs]
        assert "attach_error" not in per_rank[0], per_rank[0]["attach_error"]
        assert set(per_rank[0]["placements"].values()) == {("(Shard(dim=0),)", "(Shard(dim=0),)")}
        if variant == "scalar":
            _check_mode(per_rank, STEPS)
            continue
        r0 = per_rank[0]
        assert r0["kernels"] == STEPS and all(res["ranks_identical"] and res["shard_local"] for res in per_rank)
        assert r0["step_error"] < 1e-5 and r0["traj_error"] < 1e-5 and r0["effect"] > 1e-2, r0
        states = {"adamw": 2, "sgd": 1}[opt]
        for res in per_rank:
            for k, comm in enumerate(res["comm"]):
                # one all-gather of every pair's A and grad_A shards (gradient space), and of A's state
                # (parameter space; no state before the first step); keeping one's own rows after the
                # step needs no collective
                assert comm["calls"] == GROUPS + 1, (k, comm)
                assert comm["counts"] == {"c10d.allreduce_": GROUPS, "c10d.allgather_": 1}, (k, comm)
                # 14 shards of A (2, m) float32, m = 32 for 12 pairs and 64 for 2: 4096 bytes per gathered set
                moves = 2 if space == "gradient" else 2 + (states if k else 0)
                assert comm["bytes"] == _bytes_per_step(variant) + moves * 4096, (k, comm)


def test_hsdp_two_dimensional_mesh() -> None:
    # 2 replicas x 2 shards: the Grams are reduced over the shard dimension only
    runs = launch("train", 4, {"kind": "hsdp", "modes": MODES, "steps": 3}, timeout=170)
    for m in range(len(MODES)):
        per_rank = [r[m] for r in runs]
        assert set(per_rank[0]["placements"].values()) == {
            ("(Replicate(), Shard(dim=1))", "(Replicate(), Shard(dim=0))")}
        _check_mode(per_rank, 3)


def test_ddp_matches_one_process_in_all_modes(pooled) -> None:
    runs = _part(pooled, "ddp")
    for m in range(len(MODES)):
        per_rank = [r[m] for r in runs]
        r0 = per_rank[0]
        assert r0["traj_error"] < 1e-5 and r0["step_error"] < 1e-5 and r0["effect"] > 1e-2, r0
        assert all(r["products_identical"] for r in per_rank)  # factors bitwise equal on every rank
        assert all(r["ranks_identical"] for r in per_rank)
        # replicated factors: nothing to reduce, RefLoRA adds no communication to DDP
        assert all(c["counts"] == {} and c["calls"] == 0 for r in per_rank for c in r["comm"])


def test_dcp_checkpoint_resumes_on_two_and_on_one_process(pooled) -> None:
    # gradient space with a cached metric (interval 2: step 3 applies step 2's S after the resume)
    # and parameter space (Adam's moments transported every step)
    configs = DCP_CONFIGS
    saved = _part(pooled, "dcp")  # save on 2, resume on 2
    (single,) = launch("dcp", 1, dict(DCP_ARGS, ckpt=pooled["ckpt"], phase="load"), timeout=120)  # resume on 1
    for c, cfg in enumerate(configs):
        for res in [saved[0][c], saved[1][c], single[c]]:
            assert res["loaded_step_count"] == 3 and res["step_count"] == 6, (cfg, res)
            assert res["resumed_error"] < 1e-5, (cfg, res)
        assert len(saved[0][c]["loaded_cached"]) == (14 if cfg.get("interval", 1) > 1 else 0)


def test_placements_replicated_uneven_and_empty_shards(pooled) -> None:
    runs = _part(pooled, "placements")
    cases = PLACEMENT_CASES
    for rank, results in enumerate(runs):
        assert len(results) == 4 * len(cases)
        for res in results:
            assert res["error"] < 1e-5, res
            full = res["mode"].startswith("full")
            f = res["case"].get("moved", 0) if full else 0
            calls = res["case"].get("full_calls", res["case"]["calls"]) if full else res["case"]["calls"]
            # one all-reduce per step, or none; one all-gather per step of the gathered factors, their
            # gradients and (parameter space) AdamW's moments; over 3 steps
            assert res["calls"] == 3 * calls + (3 if f else 0), res
        empty = [res for res in results if res["case"]["shape"] == [1, 1, 6]]
        assert all(res["local_A"] == ((1, 1) if rank == 0 else (1, 0)) for res in empty)


def test_fsdp2_example_under_torchrun(tmp_path) -> None:
    import sys
    from pathlib import Path

    from distributed_launch import ROOT, _env, run_command

    env = _env(0, 1, "", str(tmp_path), None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "fsdp2.py"), "--steps", "5",
           "--checkpoint", str(tmp_path / "ckpt")]
    run_command([cmd], [env], [tmp_path / "log"], timeout=120)
    out = (tmp_path / "log").read_text()
    # r = 8, 14 pairs in 3 same-shape groups: 14 x 2 x 64 float64 = 14336 bytes in 3 all-reduces,
    # from the fourth step on (the default's warmup: nothing to send before)
    assert out.count("RefLoRA: 0 all-reduce(s), 0 bytes") == 3, out[-3000:]
    assert out.count("RefLoRA: 3 all-reduce(s), 14336 bytes") == 2, out[-3000:]
    assert "checkpoint saved and loaded" in out and "(RefLoRA step 5)" in out
