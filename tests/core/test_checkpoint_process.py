"""Save mid-run, resume in a *new process*: identical to the uninterrupted run, all four modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from attach_helpers import MODES, setup, train

HERE = Path(__file__).resolve().parents[1] / "helpers"
SCRIPT = r"""
import sys, torch
sys.path.insert(0, {here!r})
from attach_helpers import MODES, setup, train
phase, path = sys.argv[1], sys.argv[2]
out = {{}}
for variant, space in MODES:
    key = f"{{variant}}-{{space}}"
    net, opt, handle = setup("AdamW", variant, space, warmup_steps=1, interval=2)
    if phase == "first":
        train(net, opt, 7)
        out[key] = {{"model": net.state_dict(), "opt": opt.state_dict(), "reflora": handle.state_dict()}}
    else:
        ckpt = torch.load(path, weights_only=False)[key]
        net.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); handle.load_state_dict(ckpt["reflora"])
        train(net, opt, 6)
        out[key] = [p.detach() for p in net.parameters()]
torch.save(out, path if phase == "first" else path + ".final")
"""


def test_resume_in_a_new_process_is_identical(tmp_path) -> None:
    script = tmp_path / "phase.py"
    script.write_text(SCRIPT.format(here=str(HERE)))
    ckpt = tmp_path / "ckpt.pt"
    for phase in ("first", "second"):
        subprocess.run([sys.executable, str(script), phase, str(ckpt)], check=True)
    resumed = torch.load(str(ckpt) + ".final", weights_only=False)
    for variant, space in MODES:
        net, opt, _ = setup("AdamW", variant, space, warmup_steps=1, interval=2)
        train(net, opt, 13)
        got = resumed[f"{variant}-{space}"]
        for p, q in zip(net.parameters(), got):
            assert torch.equal(p.detach(), q), (variant, space)
