"""transformers.Trainer + RefLoRACallback on 2 CPU processes, under accelerate launch and torchrun.

Each test trains 6 steps with a checkpoint every 3 (tests/helpers/distributed_trainer_script.py), then
resumes from checkpoint-3 (in new processes under another launcher for DDP; with model,
Trainer and callback built anew in the same processes for FSDP2) and must end with the same
LoRA factors as the uninterrupted run. The DDP test launches twice (accelerate launch, then
torchrun); the torchrun scenarios share one launch (the ``pooled`` fixture).

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
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out: Path) -> dict | list[dict]:
    """A run's result (with ``--then-resume``: the first run's and the resumed one's)."""
    results = []
    for path in (out, Path(str(out) + ".resumed")):
        if path.exists():
            res = json.loads(path.read_text())
            if "error" in res:
                raise AssertionError(f"the run {out.name} raised in the worker:\n{res['error']}")
            res["factors"] = torch.load(str(path) + ".pt", weights_only=False)
            results.append(res)
    assert results, f"the run {out.name} wrote no result"
    return results[0] if len(results) == 1 else results


def _env_without_rank(tmp: Path) -> dict:
    env = _env(0, 1, "", str(tmp), None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k)
    return env


def _run(tmp: Path, launcher: str, name: str, args: list[str], timeout: float = 120) -> dict:
    out = tmp / f"{name}.json"
    if launcher == "torchrun":
        cmd = list(TORCHRUN)
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
    run_command([cmd], [_env_without_rank(tmp)], [tmp / f"{name}.log"], timeout)
    return _results(out)


def _check_resume(run_dir: Path, first: dict, resumed: dict, interval: int) -> None:
    assert first["global_step"] == resumed["global_step"] == 6
    assert first["seen"]["world"] == 2 and first["seen"]["step_count"] == 6 == resumed["seen"]["step_count"]
    assert all(torch.isfinite(torch.tensor(first["losses"])))
    state = torch.load(run_dir / "checkpoint-3" / STATE_FILE, weights_only=False)
    assert state["step_count"] == 3 and state["interval"] == interval and len(state["pair_names"]) == 14
    a, b = first["factors"], resumed["factors"]
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), k


FOUR_MODES = ["full/parameter", "full/gradient", "scalar/parameter", "scalar/gradient"]
MODES_ARGS = ["--modes", ",".join(FOUR_MODES), "--float64", "--max-steps", "4"]

# The torchrun scenarios run in one launch of 2 processes (the script's --runs: one Trainer after
# the other, accelerate's state built anew by each), so that the processes and their imports are
# paid once; each test asserts on its own run, and a run that raised fails its test alone.
# test -> (run, its arguments, its own timeout in seconds); the launch's timeout is the sum over
# the runs this session selected
POOL = {
    # accelerate's own fully_shard: lora_A on FSDP2's default Shard(0), which the scalar variant
    # takes; the resume builds model, Trainer and callback anew in the same processes
    "test_trainer_fsdp2_accelerate_sharding_scalar_variant": (
        "scalar", ["--backend", "fsdp2", "--cpu-fsdp-gate", "--variant", "scalar", "--space", "parameter",
                   "--interval", "2", "--then-resume"], 120),
    # the full variant needs lora_A sharded along m: shard the model with lora_shard_placement
    # before Trainer; accelerate keeps an already sharded model as it is
    "test_trainer_fsdp2_presharded_model_full_variant": (
        "preshard", ["--backend", "fsdp2", "--cpu-fsdp-gate", "--preshard", "--variant", "full", "--space", "gradient",
                     "--interval", "2", "--then-resume"], 120),
    # accelerate's behaviour that the FSDP2 runs work around: without the lifted gate, an FSDP
    # config on CPU processes trains under DDP (plain, replicated factors)
    "test_trainer_fsdp_config_falls_back_to_ddp_on_cpu": (
        "fallback", ["--backend", "fsdp2", "--variant", "scalar", "--space", "parameter", "--max-steps", "2"], 90),
    # Trainer's fsdp_config (version 2), every mode in float64 for 4 steps (one Trainer per mode)
    "test_trainer_fsdp2_default_placement_all_modes_match_one_process": (
        "modes", ["--backend", "fsdp2", "--cpu-fsdp-gate", *MODES_ARGS], 180),
}


@pytest.fixture(scope="module")
def pooled(request, tmp_path_factory) -> Path:
    """The folder of one torchrun launch of 2 processes running the runs of the tests this session
    selected (``NAME.json``, ``NAME-run/``); beside it, when the all-modes test is selected, the
    one-process reference of that test (``single.json``)."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    parts = [v for k, v in POOL.items() if k in selected]
    tmp = tmp_path_factory.mktemp("trainer")
    runs = [[str(tmp / f"{name}.json"), "--run-dir", str(tmp / f"{name}-run"), *args] for name, args, _ in parts]
    env = _env_without_rank(tmp)
    cmds = [[*TORCHRUN, SCRIPT, "--runs", json.dumps(runs)]]
    envs, logs = [env], [tmp / "pooled.log"]
    if any(name == "modes" for name, *_ in parts):
        # one process on the same global batches of 4, launched alongside
        cmds.append([sys.executable, SCRIPT, str(tmp / "single.json"), "--run-dir", str(tmp / "single-run"),
                     "--backend", "single", "--batch", "4", *MODES_ARGS])
        envs.append(dict(env))
        logs.append(tmp / "single.log")
    run_command(cmds, envs, logs, timeout=sum(t for *_, t in parts))
    return tmp


def test_trainer_ddp_accelerate_launch_then_resume_under_torchrun(tmp_path) -> None:
    # two launchers, two launches: accelerate launch trains, torchrun resumes from checkpoint-3
    args = ["--backend", "ddp", "--variant", "full", "--space", "parameter", "--interval", "2"]
    first = _run(tmp_path, "accelerate", "first", args)
    assert first["seen"]["sharded"] == "LoRAPair"  # DDP: replicated factors
    resumed = _run(tmp_path, "torchrun", "resumed", args + ["--resume-from", str(tmp_path / "run" / "checkpoint-3")])
    _check_resume(tmp_path / "run", first, resumed, 2)


def test_trainer_fsdp2_accelerate_sharding_scalar_variant(pooled) -> None:
    first, resumed = _results(pooled / "scalar.json")
    assert first["seen"]["sharded"] == "ShardedLoRAPair" and first["seen"]["placements"] == "(Shard(dim=0),)"
    assert (pooled / "scalar-run" / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint
    _check_resume(pooled / "scalar-run", first, resumed, 2)


def test_trainer_fsdp2_presharded_model_full_variant(pooled) -> None:
    first, resumed = _results(pooled / "preshard.json")
    assert first["seen"]["sharded"] == "ShardedLoRAPair" and first["seen"]["placements"] == "(Shard(dim=1),)"
    _check_resume(pooled / "preshard-run", first, resumed, 2)


def test_trainer_fsdp_config_falls_back_to_ddp_on_cpu(pooled) -> None:
    first = _results(pooled / "fallback.json")
    assert first["seen"]["sharded"] == "LoRAPair" and first["seen"]["placements"] == "None"
    assert first["seen"]["world"] == 2 and first["global_step"] == 2


def test_trainer_fsdp2_default_placement_all_modes_match_one_process(pooled) -> None:
    # accelerate shards every parameter on FSDP2's default Shard(0), lora_A along its rank
    # dimension; against one process on the same global batches of 4: equal to round-off
    assert not (pooled / "modes.json").exists(), _results(pooled / "modes.json")  # the run raised
    finals = []
    for i, mode in enumerate(FOUR_MODES):
        sharded, one = (_results(pooled / f"{name}.json.{i}") for name in ("modes", "single"))
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
