"""``reflora.integrations.lightning.RefLoRACallback`` under a real PyTorch Lightning ``Trainer``.

Single-device tests run in this process on the model of ``tests/helpers/lightning_script.py`` (float64):
the callback's run equals a hand-written loop with ``reflora.attach`` (automatic and manual
optimisation, gradient accumulation, a scheduler config), a ``ckpt_path`` resume equals the
uninterrupted run bit for bit, the precision plugins match autocast loops within float32
round-off, several optimizers get a handle each, and the diagnostics reach the logger. DDP and
FSDP2 (``ModelParallelStrategy``) run the script in 2 gloo processes.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not importlib.util.find_spec("pytorch_lightning"), reason="needs the lightning extra"),
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning_fabric.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

if importlib.util.find_spec("pytorch_lightning"):
    import pytorch_lightning as pl

    import lightning_script as ls
    from reflora.integrations.lightning import RefLoRACallback

import reflora

HERE = Path(__file__).resolve().parents[1] / "helpers"


def _args(**kw) -> argparse.Namespace:
    base = dict(strategy="single", precision="64-true", manual=False, accumulate=1, optimizer="sgd", samples=64)
    return argparse.Namespace(**{**base, **kw})


def _trainer(steps, callbacks, tmp_path, precision="32-true", accumulate=1, logger=False, **kw):
    checkpoints = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision,
                      accumulate_grad_batches=accumulate, logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=checkpoints, callbacks=callbacks,
                      log_every_n_steps=1, default_root_dir=tmp_path, use_distributed_sampler=False, **kw)


def _fit(args, steps, tmp_path, reflora_kw=None, **trainer_kw):
    module = ls.Module(args)
    cb = [] if reflora_kw is None else [RefLoRACallback(**reflora_kw)]
    precision = "32-true" if args.precision == "64-true" else args.precision
    trainer = _trainer(steps, cb, tmp_path, precision=precision,
                       accumulate=1 if args.manual else args.accumulate, **trainer_kw)
    trainer.fit(module)
    return module, trainer, (cb[0] if cb else None)


def _factors(module):
    return {n: p.detach().clone() for n, p in module.net.named_parameters() if p.requires_grad}


def _by_hand(args, steps, attach_kw=None, autocast=None, scaler=False, ema=None):
    """The same optimizer steps written out: batches of 8 in order, ``accumulate`` backward passes
    of ``loss / accumulate`` per step, the scheduler stepped after each optimizer step; with
    ``ema=(decay, follow)`` the factors of an EMA of the module updated after each step (and
    following the refactors if ``follow``) are returned instead."""
    module = ls.Module(args)
    net = module.net
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    average = None
    if ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

        average = AveragedModel(module, avg_fn=get_ema_avg_fn(ema[0]), use_buffers=True)
    if attach_kw is not None:
        handle = reflora.attach(opt, [(net.l0.lora_A, net.l0.lora_B), (net.l1.lora_A, net.l1.lora_B)], **attach_kw)
        if average is not None and ema[1]:
            handle.follow([(m.lora_A, m.lora_B) for m in (average.module.net.l0, average.module.net.l1)])
    ds = ls.data(net.l0.lora_A.dtype)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=ls.GLOBAL_BATCH))
    amp = torch.amp.GradScaler("cpu") if scaler else None
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(args.accumulate):
            x, y = next(loader)
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = (net(x) - y).square().mean() / args.accumulate
            (amp.scale(loss) if amp else loss).backward()
        if amp:
            amp.step(opt)
            amp.update()
        else:
            opt.step()
        sched.step()
        if average is not None:
            average.update_parameters(module)
    if average is not None:
        net = average.module.net
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def _same(got, want, atol=0.0, rtol=0.0):
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("manual, accumulate", [(False, 1), (False, 2), (True, 2)],
                         ids=["automatic", "automatic-accumulate2", "manual-accumulate2"])
def test_callback_equals_a_hand_written_loop(optimizer, manual, accumulate, tmp_path) -> None:
    args = _args(optimizer=optimizer, manual=manual, accumulate=accumulate)
    module, trainer, cb = _fit(args, 4, tmp_path, dict(warmup_steps=1))
    want = _by_hand(args, 4, dict(warmup_steps=1))
    assert cb.handle.step_count == 4 and len(cb.handle.pairs) == 2
    _same(_factors(module), want)
    bare = _by_hand(args, 4)
    assert any(not torch.allclose(_factors(module)[k], bare[k]) for k in bare), "RefLoRA did not act"


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_a_weight_averaging_callbacks_copy_follows_the_refactors(kind, tmp_path) -> None:
    """Lightning's EMAWeightAveraging keeps an averaged copy of the module: it follows every
    parameter-space refactor, like handle.follow in a hand-written loop (and unlike a copy that
    does not follow). StochasticWeightAveraging's copy is followed too."""
    args = _args(optimizer="adamw")
    if kind == "swa":
        module = ls.Module(args)
        swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
        cb = RefLoRACallback(space="parameter", resolved=0.0, warmup_steps=0)
        _trainer(2, [cb, swa], tmp_path).fit(module)
        assert cb.handle.runner.followers and all(
            any(f.A is p for p in swa._average_model.parameters()) for fs in cb.handle.runner.followers.values() for f in fs)
        return
    module = ls.Module(args)
    attach_kw = dict(space="parameter", resolved=0.0, warmup_steps=0)
    cb = RefLoRACallback(**attach_kw)
    _trainer(4, [cb, pl.callbacks.EMAWeightAveraging(decay=0.7)], tmp_path).fit(module)
    got = _factors(module)  # on_train_end copies the average into the module
    _same(got, _by_hand(args, 4, attach_kw, ema=(0.7, True)), rtol=1e-12, atol=1e-14)
    drifted = _by_hand(args, 4, attach_kw, ema=(0.7, False))
    assert any(not torch.allclose(got[k], drifted[k]) for k in got), "the refactors never reached the average"


def _checkpoint_after_one_epoch(args, tmp_path, callbacks, precision="32-true"):
    """Train 3 steps and save. Every batch is the same (8 samples, one batch an epoch): Lightning
    restarts a resumed epoch's loader (and, resumed at an epoch's end, replays its first batch),
    so only a one-batch epoch makes the resumed run see the uninterrupted run's data."""
    assert args.samples == ls.GLOBAL_BATCH
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    _trainer(3, [*callbacks, ckpt], tmp_path / "a", precision=precision).fit(ls.Module(args))
    (path,) = (tmp_path / "ck").glob("*.ckpt")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_from_ckpt_path_equals_the_uninterrupted_run(optimizer, tmp_path) -> None:
    """float64 on CPU: bit for bit, the counter past the warmup and the optimizer state included."""
    args = _args(optimizer=optimizer, samples=8)
    full, _, full_cb = _fit(args, 6, tmp_path / "full", dict(warmup_steps=4))
    path = _checkpoint_after_one_epoch(args, tmp_path, [RefLoRACallback(warmup_steps=4)])
    state = torch.load(path, weights_only=False)
    assert state["callbacks"]["RefLoRACallback"]["handles"][0]["step_count"] == 3
    second = ls.Module(args)
    cb = RefLoRACallback(warmup_steps=4)
    _trainer(6, [cb], tmp_path / "b").fit(second, ckpt_path=path)
    assert cb.handle.step_count == 6 == full_cb.handle.step_count
    _same(_factors(second), _factors(full))


@pytest.mark.slow
def test_resume_in_mixed_precision_is_within_float32_round_off(tmp_path) -> None:
    args = _args(precision="bf16-mixed", optimizer="adamw", samples=8)
    full, _, _ = _fit(args, 6, tmp_path / "full", dict(warmup_steps=1))
    path = _checkpoint_after_one_epoch(args, tmp_path, [RefLoRACallback(warmup_steps=1)], precision="bf16-mixed")
    second = ls.Module(args)
    _trainer(6, [RefLoRACallback(warmup_steps=1)], tmp_path / "b", precision="bf16-mixed").fit(second, ckpt_path=path)
    _same(_factors(second), _factors(full), atol=1e-6, rtol=1e-5)


def _fp16_with_scaler():
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("precision, autocast, scaler", [
    ("bf16-mixed", torch.bfloat16, False),
    ("16-mixed", torch.bfloat16, False),  # Lightning's "16-mixed" on a CPU autocasts to bfloat16, no scaler
    ("16-mixed+GradScaler", torch.float16, True),  # float16 with a GradScaler, as on a GPU
])
def test_precision_plugins_match_an_autocast_loop(precision, autocast, scaler, tmp_path) -> None:
    """RefLoRA sees the gradients the precision plugin gives the optimizer (unscaled by the scaler
    first); with accumulation over 2 batches the run equals the autocast loop written out."""
    args = _args(precision="16-mixed" if scaler else precision, accumulate=2)
    module = ls.Module(args)
    cb = RefLoRACallback(warmup_steps=1)
    plugin = dict(plugins=[_fp16_with_scaler()]) if scaler else dict(precision=precision)
    pl.Trainer(max_steps=4, accelerator="cpu", devices=1, accumulate_grad_batches=2, logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               use_distributed_sampler=False, callbacks=[cb], **plugin).fit(module)
    want = _by_hand(args, 4, dict(warmup_steps=1), autocast=autocast, scaler=scaler)
    assert cb.handle.step_count == 4
    _same(_factors(module), want, atol=1e-6, rtol=1e-5)
    bare = _by_hand(args, 4, autocast=autocast, scaler=scaler)
    assert any((_factors(module)[k] - bare[k]).abs().max() > 1e-3 for k in bare), "RefLoRA did not act"


class _TwoOptimizers(ls.Module if importlib.util.find_spec("pytorch_lightning") else object):
    """Manual optimisation with one optimizer per layer (Lightning needs manual optimisation for
    several optimizers)."""

    def __init__(self, args, split_pair: bool = False) -> None:
        super().__init__(args)
        self.automatic_optimization = False
        self.split_pair = split_pair

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self):
        l0, l1 = self.net.l0, self.net.l1
        if self.split_pair:
            return [torch.optim.SGD([l0.lora_A, l1.lora_B], lr=0.05), torch.optim.SGD([l0.lora_B, l1.lora_A], lr=0.05)]
        return [torch.optim.SGD([l0.lora_A, l0.lora_B], lr=0.05), torch.optim.AdamW([l1.lora_A, l1.lora_B], lr=1e-2)]


@pytest.mark.slow
def test_several_optimizers_get_a_handle_each_and_checkpoint_both(tmp_path) -> None:
    cb = RefLoRACallback(warmup_steps=0, log_diagnostics=True)
    module = _TwoOptimizers(_args())
    trainer = _trainer(6, [cb], tmp_path)  # manual optimisation: global_step counts each optimizer's steps
    trainer.fit(module)
    assert trainer.global_step == 6
    assert [h.space for h in cb.handles] == ["gradient", "parameter"]
    assert [[p.name for p in h.pairs] for h in cb.handles] == [["net.l0"], ["net.l1"]]
    state = cb.state_dict()
    assert state["optimizers"] == [0, 1] and [s["step_count"] for s in state["handles"]] == [3, 3]
    with pytest.raises(AttributeError, match="has 2 handles"):
        cb.handle  # noqa: B018
    with pytest.raises(ValueError, match="A and B are in different optimizers"):
        _trainer(1, [RefLoRACallback()], tmp_path).fit(_TwoOptimizers(_args(), split_pair=True))


@pytest.mark.slow
def test_diagnostics_and_counters_reach_the_logger(tmp_path) -> None:
    logger = pl.loggers.CSVLogger(tmp_path)
    module, trainer, cb = _fit(_args(), 5, tmp_path, dict(warmup_steps=2, log_diagnostics=True), logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"reflora/step_count", "reflora/refactor_count", "reflora/S_deviation_max", "reflora/imbalance_abs_mean"} \
        <= set(rows[0])
    counts = [(float(r["reflora/step_count"]), float(r["reflora/refactor_count"])) for r in rows]
    assert counts == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]  # acting from the third step (t = 2) on
    assert cb.handle.diagnostics_interval == 1  # the Trainer's log_every_n_steps


@pytest.mark.slow
def test_resume_without_refloras_state_warns_and_sets_the_counter(tmp_path) -> None:
    args = _args(optimizer="adamw", samples=8)
    path = _checkpoint_after_one_epoch(args, tmp_path, [])  # trained without RefLoRA
    cb = RefLoRACallback(warmup_steps=4)
    with pytest.warns(UserWarning, match="resuming at global step 3 without RefLoRA's state"):
        _trainer(5, [cb], tmp_path / "b").fit(ls.Module(args), ckpt_path=path)
    assert cb.handle.step_count == 5


def test_strategies_it_cannot_run_under_are_refused_by_name() -> None:
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    class FakeTrainer:
        def __init__(self, strategy):
            self.strategy, self.optimizers, self.log_every_n_steps = strategy, [], 1

    for cls, match in ((FSDPStrategy, "FSDPStrategy is FSDP1"), (DeepSpeedStrategy, "DeepSpeedStrategy")):
        strategy = cls.__new__(cls)  # no process group or deepspeed needed to be refused
        with pytest.raises(TypeError, match=rf"cannot run under {cls.__name__}: .*{match}"):
            RefLoRACallback().on_fit_start(FakeTrainer(strategy), None)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="log_diagnostics must be a bool"):
        RefLoRACallback(log_diagnostics=1)
    with pytest.raises(TypeError, match="example_inputs= finds pairs in the module"):
        RefLoRACallback(pairs=[], example_inputs=torch.ones(1))


def _script(tmp_path, name, *argv) -> dict:
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(HERE / "lightning_script.py"), str(out), *argv], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The script's one-process run (``lightning_script.py OUT --steps 4``), in this process: the
    same module, callback and Trainer settings."""
    module, _, cb = _fit(_args(), 4, tmp_path_factory.mktemp("one"),
                         reflora_kw=dict(warmup_steps=1, log_diagnostics=True))
    return {"factors": _factors(module), "step_count": cb.handle.step_count}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_each_other_and_one_process(strategy, one_process, tmp_path) -> None:
    """DDP (replicated factors) and FSDP2 through ModelParallelStrategy (sharded factors, both
    placements of the rank dimension): each rank of 2 holds the factors of the 1-process run
    (float64; the global batch is the same, split over the ranks)."""
    one = one_process
    two = _script(tmp_path, strategy, "--strategy", strategy, "--devices", "2", "--steps", "4")
    assert two["step_count"] == one["step_count"] == 4
    for rank in two["ranks"]:
        _same(rank, one["factors"], atol=1e-13, rtol=1e-12)
    assert two["logged"]["reflora/refactor_count"] == 3.0
