"""``optimizer.step(closure)``: RefLoRA acts on the gradients the closure computes.

An optimizer calls its closure inside ``step()``, after the step pre-hooks. The handle therefore
wraps the closure (a pre-hook may return new arguments) and acts when it returns. A closure run
must equal the same run written as ``loss.backward(); opt.step()``, in every mode, after a resume
and in a compiled step; and it must differ from the bare optimizer (RefLoRA is not a no-op).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

import reflora
from attach_helpers import MODE_IDS, MODES, LoRANet

OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=2e-2, weight_decay=0.0),
}


def _lowbit(ps):
    import bitsandbytes as bnb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnb.optim.AdamW8bit(ps, lr=2e-2, min_8bit_size=0)


if importlib.util.find_spec("bitsandbytes"):
    OPTIMIZERS["bnb-AdamW8bit"] = _lowbit


def _closure(net, opt):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = net.loss()
        loss.backward()
        return loss

    return closure


def _run(opt_name, variant, space, steps, *, closure, attach=True, net=None, opt=None, handle=None):
    net = LoRANet(dtype=torch.float64 if opt_name != "bnb-AdamW8bit" else torch.float32) if net is None else net
    if opt is None:
        opt = OPTIMIZERS[opt_name](list(net.parameters()))
    if attach and handle is None:
        handle = reflora.attach(opt, net.pairs(), variant=variant, space=space, warmup_steps=1)
    fn = _closure(net, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes on CPU
        for _ in range(steps):
            if closure:
                opt.step(fn)
            else:
                fn()
                opt.step()
    return net, opt, handle


def _factors(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_closure_run_equals_the_backward_then_step_run(opt_name, variant, space) -> None:
    got, _, handle = _run(opt_name, variant, space, 5, closure=True)
    ref, _, _ = _run(opt_name, variant, space, 5, closure=False)
    bare, _, _ = _run(opt_name, variant, space, 5, closure=False, attach=False)
    assert handle.step_count == 5
    for p, q in zip(_factors(got), _factors(ref)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # RefLoRA acted: the B A products differ from the bare optimizer's
    diff = max(float((b @ a - b0 @ a0).detach().abs().max()) for (a, b), (a0, b0) in zip(got.pairs(), bare.pairs()))
    assert diff > 1e-4, diff


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_closure_after_a_resume_equals_the_uninterrupted_run(variant, space) -> None:
    """The first step after a resume has no gradients before the closure runs: parameter space
    used to skip every pair there."""
    ref, _, _ = _run("AdamW", variant, space, 6, closure=False)
    net, opt, handle = _run("AdamW", variant, space, 3, closure=True)
    saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(handle.state_dict()))
    net2 = LoRANet(dtype=torch.float64)
    net2.load_state_dict(saved[0])
    opt2 = OPTIMIZERS["AdamW"](list(net2.parameters()))
    opt2.load_state_dict(saved[1])
    handle2 = reflora.attach(opt2, net2.pairs(), variant=variant, space=space, warmup_steps=1)
    handle2.load_state_dict(saved[2])
    _run("AdamW", variant, space, 3, closure=True, net=net2, opt=opt2, handle=handle2)
    for p, q in zip(_factors(net2), _factors(ref)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.compile
@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_compiled_step_with_a_closure_equals_eager(space) -> None:
    torch._dynamo.reset()
    net = LoRANet(dtype=torch.float64)
    opt = torch.optim.SGD(list(net.parameters()), lr=0.3, momentum=0.9)
    reflora.attach(opt, net.pairs(), space=space, warmup_steps=1)
    fn = _closure(net, opt)

    @torch.compile(fullgraph=False, backend="aot_eager")
    def step():
        return opt.step(fn)

    for _ in range(5):
        step()
    ref, _, _ = _run("SGD", "full", space, 5, closure=False)
    for p, q in zip(_factors(net), _factors(ref)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


class _Twice(torch.optim.SGD):
    """Evaluates its closure twice per step (as SAM-style optimizers do)."""

    def step(self, closure=None):
        with torch.enable_grad():
            closure()
        return super().step(closure)


def test_a_closure_called_twice_acts_on_the_first_evaluation() -> None:
    """RefLoRA acts once per step, when the closure first returns; a second evaluation
    recomputes the raw gradients (documented in docs/semantics.md)."""
    net = LoRANet(dtype=torch.float64)
    opt = _Twice(list(net.parameters()), lr=0.3)
    handle = reflora.attach(opt, net.pairs(), space="parameter", warmup_steps=0)
    acted = []
    orig = handle.strategy.pre_step
    handle.strategy.pre_step = lambda *a: (acted.append(1), orig(*a))[1]
    fn = _closure(net, opt)
    for _ in range(3):
        opt.step(fn)
    assert acted == [1, 1, 1] and handle.step_count == 3


def test_an_optimizer_that_never_calls_the_closure_is_named() -> None:
    class Lazy(torch.optim.SGD):
        def step(self, closure=None):  # ignores the closure (a bug RefLoRA must not hide)
            return super().step()

    net = LoRANet(dtype=torch.float64)
    opt = Lazy(list(net.parameters()), lr=0.3)
    reflora.attach(opt, net.pairs(), space="gradient", warmup_steps=0)
    net.loss().backward()
    with pytest.warns(UserWarning, match=r"returned without calling the closure, so RefLoRA"):
        opt.step(lambda: None)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("pytorch_lightning"), reason="needs the lightning extra")
def test_lightning_trainer_automatic_optimisation_runs_reflora(tmp_path) -> None:
    """A real Lightning ``Trainer`` steps with a closure (and accumulates gradients over 2 batches):
    RefLoRA acts (the factors differ from the run without it) and equals a hand-written loop."""
    import pytorch_lightning as pl

    X = torch.randn(8, 16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class Module(pl.LightningModule):
        def __init__(self, use_reflora: bool) -> None:
            super().__init__()
            self.net = LoRANet(dtype=torch.float64)
            self.use_reflora = use_reflora

        def training_step(self, batch, _):
            return self.net.loss() * (1 + batch.mean() * 0)

        def configure_optimizers(self):
            opt = torch.optim.SGD(list(self.net.parameters()), lr=0.3, momentum=0.9)
            if self.use_reflora:
                reflora.attach(opt, self.net.pairs(), space="gradient", warmup_steps=1)
            return opt

    def fit(use_reflora):
        module = Module(use_reflora)
        trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, torch.utils.data.DataLoader(X, batch_size=1))
        return module.net

    with_reflora, without = fit(True), fit(False)
    # the same 4 optimizer steps by hand: 2 accumulated backward passes (loss / 2) per step
    ref = LoRANet(dtype=torch.float64)
    opt = torch.optim.SGD(list(ref.parameters()), lr=0.3, momentum=0.9)
    reflora.attach(opt, ref.pairs(), space="gradient", warmup_steps=1)
    for _ in range(4):
        opt.zero_grad()
        for _ in range(2):
            (ref.loss() / 2).backward()
        opt.step()
    for p, q in zip(_factors(with_reflora), _factors(ref)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(p, q) for p, q in zip(_factors(with_reflora), _factors(without)))


def test_a_step_that_raised_does_not_stop_later_steps() -> None:
    """A step that raises after the pre-hook (an OOM caught by the training loop) never reaches
    the post-hook; the next step must still act and count."""

    class Flaky(torch.optim.SGD):
        fail = True

        def step(self, closure=None):
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("out of memory")
            return super().step(closure)

    net = LoRANet(dtype=torch.float64)
    opt = Flaky(list(net.parameters()), lr=0.3)
    handle = reflora.attach(opt, net.pairs(), space="gradient", warmup_steps=0)
    fn = _closure(net, opt)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(fn)
    for _ in range(3):
        opt.step(fn)
    assert handle.step_count == 3
    ref = LoRANet(dtype=torch.float64)
    ref_opt = torch.optim.SGD(list(ref.parameters()), lr=0.3)
    reflora.attach(ref_opt, ref.pairs(), space="gradient", warmup_steps=0)
    _run("SGD", "full", "gradient", 3, closure=True, net=ref, opt=ref_opt, handle=True)
    for p, q in zip(_factors(net), _factors(ref)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
