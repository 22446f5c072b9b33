"""RefLoRA inside transformers.Trainer: attach by callback, checkpoint with save_steps, resume."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from reflora.integrations.transformers import STATE_FILE, RefLoRACallback  # noqa: E402


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
    )
    base = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))


def _data(n=32, seq=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (n, seq), generator=g)]


def _trainer(out, callback, max_steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=5e-3, save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
    )
    return transformers.Trainer(model=_model(), args=args, train_dataset=_data(), callbacks=[callback])


@pytest.mark.slow
@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_trainer_callback_trains_saves_and_resumes_identically(tmp_path, space) -> None:
    cb = RefLoRACallback(variant="full", space=space, interval=2)
    trainer = _trainer(tmp_path / "run", cb)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    ckpt = tmp_path / "run" / "checkpoint-3"
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert state["step_count"] == 3 and state["space"] == space and len(state["pair_names"]) == 6
    final = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    cb2 = RefLoRACallback(variant="full", space=space, interval=2)
    resumed = _trainer(tmp_path / "run", cb2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = {k: v.detach() for k, v in resumed.model.named_parameters() if v.requires_grad}
    assert final.keys() == got.keys()
    for k in final:
        assert torch.allclose(final[k], got[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.slow
def test_trainer_callback_lowers_the_loss(tmp_path) -> None:
    trainer = _trainer(tmp_path / "run", RefLoRACallback(variant="full", space="gradient"), max_steps=20)
    trainer.args.save_steps = 100
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_trainer_logs_diagnostics_through_its_reporting_callbacks(tmp_path) -> None:
    """add_callback puts RefLoRA's diagnostics summary into every log before the reporting
    integrations (here a recorder standing in for TensorBoard / W&B) see it."""
    from reflora.integrations.transformers import add_callback

    seen = []

    class Reporter(transformers.TrainerCallback):  # what TensorBoardCallback / WandbCallback see
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = _trainer(tmp_path / "run", Reporter(), max_steps=4)
    trainer.args.save_steps = 100
    cb = add_callback(trainer, variant="full", space="gradient", diagnostics_interval=2)
    trainer.train()
    step_logs = [log for log in seen if "loss" in log]
    assert len(step_logs) == 4
    for log in step_logs:
        assert log["reflora/imbalance_abs_mean"] >= 0 and log["reflora/S_deviation_max"] >= 0
        assert log["reflora/sigma_max"] >= log["reflora/sigma_min"] >= 0
    # PEFT starts from B = 0: every pair is infinitely imbalanced at step 0, finite once B moved
    assert step_logs[0]["reflora/imbalance_abs_max"] == float("inf")
    assert step_logs[-1]["reflora/imbalance_abs_max"] < float("inf")
    assert "reflora/cond_AAt_max" in trainer.state.log_history[0]
    assert cb.handle is None  # removed at train end
