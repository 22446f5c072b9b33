"""transformers.Trainer + RefLoRACallback on 2 CPU processes, under accelerate launch and torchrun.

Each test trains 6 steps with a checkpoint every 3 (tests/helpers/distributed_trainer_script.py), then
resumes from checkpoint-3 (in new processes under another launcher for DDP; with model,
Trainer and callback built anew in the same processes for FSDP2) and must end with the same
LoRA factors as the uninterrupted run.

FSDP2 through Trainer's ``fsdp_config`` (version 2) needs one lifted gate on CPU: accelerate 1.15
enables its FSDP plugin for GPU-like backends only, and on CPU processes it silently trains
under DDP instead (``test_trainer_fsdp_config_falls_back_to_ddp_on_cpu`` pins that down). The
FSDP2 tests lift that gate in the script (``--cpu-fsdp-gate``), so that accelerate's own
``fully_shard``, its sharded checkpoints and Trainer's resume run here on gloo.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_launch import ROOT, _env, run_command  # noqa: E402

from reflora.integrations.transformers import STATE_FILE  # noqa: E402

pytestmark = pytest.mark.distributed
SCRIPT = str(Path(__file__).resolve().parents[1] / "helpers" / "distributed_trainer_script.py")
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, launcher: str, name: str, args: list[str], timeout: float = 120) -> dict:
    out = tmp / f"{name}.json"
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    else:
        # accelerate's torchrun-based launcher; its MULTI_CPU launcher expects mpirun. The script
        # passes use_cpu=True to TrainingArguments, so the processes run on CPU with gloo.
        cfg = tmp / "accelerate.yaml"
        cfg.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n"
            f"machine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: {_free_port()}\nrdzv_backend: static\n"
            "same_network: true\nmixed_precision: 'no'\nuse_cpu: false\n"
        )
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(cfg)]
    cmd += [SCRIPT, str(out), "--run-dir", str(tmp / "run"), *args]
    env = _env(0, 1, "", str(tmp), None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k)
    run_command([cmd], [env], [tmp / f"{name}.log"], timeout)
    results = []
    for path in (out, Path(str(out) + ".resumed")):
        if path.exists():
            res = json.loads(path.read_text())
            res["factors"] = torch.load(str(path) + ".pt", weights_only=False)
            results.append(res)
    return results[0] if len(results) == 1 else results


def _check_resume(tmp: Path, first: dict, resumed: dict, interval: int) -> None:
    assert first["global_step"] == resumed["global_step"] == 6
    assert first["seen"]["world"] == 2 and first["seen"]["step_count"] == 6 == resumed["seen"]["step_count"]
    assert all(torch.isfinite(torch.tensor(first["losses"])))
    state = torch.load(tmp / "run" / "checkpoint-3" / STATE_FILE, weights_only=False)
    assert state["step_count"] == 3 and state["interval"] == interval and len(state["pair_names"]) == 14
    a, b = first["factors"], resumed["factors"]
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), k


def test_trainer_ddp_accelerate_launch_then_resume_under_torchrun(tmp_path) -> None:
    args = ["--backend", "ddp", "--variant", "full", "--space", "parameter", "--interval", "2"]
    first = _run(tmp_path, "accelerate", "first", args)
    assert first["seen"]["sharded"] == "LoRAPair"  # DDP: replicated factors
    resumed = _run(tmp_path, "torchrun", "resumed", args + ["--resume-from", str(tmp_path / "run" / "checkpoint-3")])
    _check_resume(tmp_path, first, resumed, 2)


def test_trainer_fsdp2_accelerate_sharding_scalar_variant(tmp_path) -> None:
    # accelerate's own fully_shard: lora_A on FSDP2's default Shard(0), which the scalar variant takes;
    # the resume builds model, Trainer and callback anew in the same processes
    args = ["--backend", "fsdp2", "--cpu-fsdp-gate", "--variant", "scalar", "--space", "parameter", "--interval", "2"]
    first, resumed = _run(tmp_path, "torchrun", "first", args + ["--then-resume"])
    assert first["seen"]["sharded"] == "ShardedLoRAPair" and first["seen"]["placements"] == "(Shard(dim=0),)"
    assert (tmp_path / "run" / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint
    _check_resume(tmp_path, first, resumed, 2)


def test_trainer_fsdp2_presharded_model_full_variant(tmp_path) -> None:
    # the full variant needs lora_A sharded along m: shard the model with lora_shard_placement
    # before Trainer; accelerate keeps an already sharded model as it is
    args = ["--backend", "fsdp2", "--cpu-fsdp-gate", "--preshard", "--variant", "full", "--space", "gradient",
            "--interval", "2"]
    first, resumed = _run(tmp_path, "torchrun", "first", args + ["--then-resume"])
    assert first["seen"]["sharded"] == "ShardedLoRAPair" and first["seen"]["placements"] == "(Shard(dim=1),)"
    _check_resume(tmp_path, first, resumed, 2)


def test_trainer_fsdp_config_falls_back_to_ddp_on_cpu(tmp_path) -> None:
    # documents accelerate's behaviour that the FSDP2 tests above work around: without the lifted
    # gate, an FSDP config on CPU processes trains under DDP (plain, replicated factors)
    args = ["--backend", "fsdp2", "--variant", "scalar", "--space", "parameter", "--max-steps", "2"]
    first = _run(tmp_path, "torchrun", "first", args)
    assert first["seen"]["sharded"] == "LoRAPair" and first["seen"]["placements"] == "None"


FOUR_MODES = ["full/parameter", "full/gradient", "scalar/parameter", "scalar/gradient"]


def test_trainer_fsdp2_default_placement_all_modes_match_one_process(tmp_path) -> None:
    # Trainer's fsdp_config (version 2): accelerate shards every parameter on FSDP2's default
    # Shard(0), lora_A along its rank dimension. Every mode, float64, 4 steps, in one launch of 2
    # processes (one Trainer per mode), against one process on the same global batches of 4
    # (launched alongside): equal to round-off
    args = ["--modes", ",".join(FOUR_MODES), "--float64", "--max-steps", "4"]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", SCRIPT, str(tmp_path / "fsdp.json"),
           "--run-dir", str(tmp_path / "run"), "--backend", "fsdp2", "--cpu-fsdp-gate", *args]
    single = [sys.executable, SCRIPT, str(tmp_path / "single.json"), "--run-dir", str(tmp_path / "run1"),
              "--backend", "single", "--batch", "4", *args]
    env = _env(0, 1, "", str(tmp_path), None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k)
    run_command([cmd, single], [env, dict(env)], [tmp_path / "fsdp.log", tmp_path / "single.log"], timeout=240)
    finals = []
    for i, mode in enumerate(FOUR_MODES):
        runs = []
        for name in ("fsdp", "single"):
            path = tmp_path / f"{name}.json.{i}"
            res = json.loads(path.read_text())
            res["factors"] = torch.load(str(path) + ".pt", weights_only=False)
            runs.append(res)
        sharded, one = runs
        assert sharded["seen"]["sharded"] == "ShardedLoRAPair", mode
        assert sharded["seen"]["placements"] == "(Shard(dim=0),)", mode  # lora_A split along r
        assert sharded["seen"]["world"] == 2 and sharded["global_step"] == one["global_step"] == 4, mode
        assert one["seen"]["sharded"] == "LoRAPair", mode
        a, b = sharded["factors"], one["factors"]
        assert a.keys() == b.keys() and len(a) == 28 and all(v.dtype == torch.float64 for v in a.values())
        worst = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)
        assert worst < 1e-10, (mode, worst)
        # (Trainer logs its running loss in float32)
        assert max(abs(x - y) for x, y in zip(sharded["losses"], one["losses"])) < 1e-5, mode
        finals.append(b)
    # each mode trains differently (a RefLoRA that did nothing under FSDP2 could not match all four)
    for i in range(len(finals)):
        for j in range(i):
            assert max(float((finals[i][k] - finals[j][k]).norm() / finals[j][k].norm()) for k in finals[i]) > 1e-4
