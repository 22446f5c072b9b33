"""One configuration (issue 18, item 2): RefLoRAConfig validates every option once, and every
entry point (attach, reflora.func, the ZeRO path) builds it from the same keywords."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import reflora
from reflora import attach
from reflora.config import RefLoRAConfig

BAD = [
    ({"variant": "half"}, ValueError, "variant"),
    ({"space": "both"}, ValueError, r"space must be one of \('auto', 'gradient', 'parameter'\)"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps must be >= 0; got -1"),
    ({"warmup_steps": 1.5}, TypeError, "warmup_steps must be an int; got float"),
    ({"interval": 0}, ValueError, "interval must be >= 1; got 0"),
    ({"interval": True}, TypeError, "interval must be an int; got bool"),
    ({"diagnostics_interval": -2}, ValueError, "diagnostics_interval must be >= 0"),
    ({"compile": 1}, TypeError, "compile must be a bool; got int"),
    ({"second_moment": "cube"}, ValueError, "second_moment must be one of"),
    ({"solver": "qr"}, ValueError, "solver"),
    ({"eps": 2.0}, ValueError, re.escape("eps must be in [0, 1); got 2.0")),
    ({"eps": "1e-6"}, TypeError, "eps must be a float or None; got str"),
    ({"resolved": 1.0}, ValueError, r"resolved must be in \[0, 1\)"),
    ({"variant": "scalar", "resolved": 0.1}, ValueError, "variant='scalar'"),
    ({"rank_above_size": "drop"}, ValueError, "rank_above_size must be 'skip' or 'act'"),
    ({"frame": "block", "resolved": 0.1}, ValueError, "frame='block' has no resolution gate"),
    ({"frame": "block", "solver": "newton_schulz"}, ValueError, "frame='block' is built on"),
    ({"frame": "block", "variant": "scalar"}, ValueError, "frame='block' is a frame of the full variant"),
    ({"frame": "block", "space": "gradient"}, ValueError, "frame='block' acts through the coordinates"),
]


@pytest.mark.parametrize("kw, exc, msg", BAD, ids=[next(iter(k)) + "-" + str(i) for i, (k, _, _) in enumerate(BAD)])
def test_every_entry_point_rejects_the_same_options_the_same_way(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        RefLoRAConfig(**kw)
    A = nn.Parameter(torch.randn(2, 6))
    B = nn.Parameter(torch.randn(5, 2))
    if "compile" not in kw and "diagnostics_interval" not in kw:  # attach-only options
        func_kw = {("reflora_eps" if k == "eps" else k): v for k, v in kw.items()}
        with pytest.raises(exc, match=msg):
            reflora.func.adamw([("A", "B")], **func_kw)
    with pytest.raises(exc, match=msg):
        reflora.attach(torch.optim.AdamW([A, B]), [(A, B)], **kw)


def test_defaults_that_depend_on_other_options_are_resolved_once():
    cfg = RefLoRAConfig()
    assert (cfg.variant, cfg.space, cfg.frame, cfg.solver, cfg.resolved) == ("full", "auto", "paper", "eigh", 0.1)
    assert RefLoRAConfig(solver="newton_schulz").frame == "symmetric"
    assert RefLoRAConfig(solver="newton_schulz").resolved == 0.0
    assert RefLoRAConfig(variant="scalar").resolved == 0.0
    assert RefLoRAConfig(eps=None).eps_for(torch.float32) == RefLoRAConfig(eps=None).eps_for(torch.float64) > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.variant = "scalar"  # type: ignore[misc]


def test_attach_and_func_hold_the_configuration():
    A = nn.Parameter(torch.randn(2, 6))
    B = nn.Parameter(torch.randn(5, 2))
    handle = reflora.attach(torch.optim.SGD([A, B], lr=0.1, momentum=0.9), [(A, B)], interval=3)
    assert isinstance(handle.config, RefLoRAConfig)
    assert handle.config == RefLoRAConfig(space="gradient", interval=3)
    assert (handle.space, handle.interval, handle.frame) == ("gradient", 3, "paper")
    opt = reflora.func.sgd([("A", "B")], momentum=0.9, interval=3)
    assert opt.config == handle.config


def test_a_handles_options_stay_assignable_and_are_validated():
    """0.2 handles had plain attributes (benchmarks/overhead.py sets warmup_steps): they still
    can be set, through a validated replacement of the configuration."""
    A = nn.Parameter(torch.randn(2, 6))
    B = nn.Parameter(torch.randn(5, 2))
    handle = reflora.attach(torch.optim.AdamW([A, B]), [(A, B)], warmup_steps=10**9)
    handle.warmup_steps = 0
    assert handle.warmup_steps == handle.config.warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        handle.warmup_steps = -1


def test_diagnostics_under_deepspeed_zero_is_an_error_naming_diagnose() -> None:
    """DeepSpeed's handle records no diagnostics: asking for them raises instead of being ignored
    (a stand-in for DeepSpeed's ZeRO-1/2 wrapper: a class from a ``deepspeed`` module holding the
    torch optimizer in ``.optimizer``)."""
    A, B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(6, 4))
    wrapper_cls = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    wrapper = wrapper_cls()
    wrapper.optimizer = torch.optim.AdamW([A, B])
    with pytest.raises(ValueError, match=r"diagnostics_interval under DeepSpeed ZeRO.*diagnose\(pairs\)"):
        attach(wrapper, [(A, B)], space="gradient", diagnostics_interval=5)
