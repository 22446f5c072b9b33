"""DeepSpeed ZeRO on 2 CPU processes (gloo): ZeRO-1/2 in gradient space against an explicit
single-process reference; parameter space and ZeRO-3 raise at attach with the cause and the way out.

See reflora/strategies.py for how (tensor hooks on the factors, before DeepSpeed's
own gradient hooks reduce them). Skipped without deepspeed (``pip install deepspeed``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_launch import launch  # noqa: E402

pytestmark = pytest.mark.distributed

GRADIENT = [["full", "gradient", "adamw"], ["scalar", "gradient", "sgd"]]
PARAMETER = [["full", "parameter", "adamw"], ["scalar", "parameter", "adamw"]]


def test_zero_1_and_2_gradient_space_match_one_process_and_the_rest_raises() -> None:
    configs = [
        {"stage": 1, "modes": GRADIENT + PARAMETER},
        {"stage": 2, "modes": GRADIENT + PARAMETER + [["full", "auto", "adamw"]]},  # auto: gradient under ZeRO
        {"stage": 2, "ga": 2, "modes": GRADIENT},  # S stays fixed over the micro-batches of a step
        {"stage": 3, "modes": GRADIENT[:1]},
    ]
    runs = launch("deepspeed", 2, {"configs": configs, "steps": 5}, timeout=170)
    results = runs[0]
    assert len(results) == 4 + 5 + 2 + 1
    for k, res in enumerate(results):
        variant, space, _ = res["mode"].split("/")
        if res["stage"] == 3:
            assert res["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
            assert "ZeRO-3" in res["attach_error"] and "FSDP2" in res["attach_error"]
            continue
        assert res["wrapper"] == "DeepSpeedZeroOptimizer"
        if space == "parameter":
            msg = res["attach_error"]
            assert "space='parameter' under DeepSpeed ZeRO" in msg and "flat partitions" in msg
            assert "space='gradient'" in msg and "FSDP2" in msg
            continue
        assert res["handle"] == "RefLoRAHandle" and res["strategy"] == "ZeroGradientStrategy", res
        assert res["deepspeed_optimizer"] and res["step_count"] == 5, res
        assert res["space"] == "gradient"  # space="auto" (AdamW) resolves to gradient space under ZeRO
        assert res["traj_error"] < 1e-5 and res["effect"] > 1e-2, res
        assert res["reflora_calls"] == 0  # replicated factors: S needs no communication
        assert all(r[k]["products_identical"] for r in runs)  # the factors agree bitwise on both ranks
