"""The RefLoRA callback under transformers.Trainer with the QLoRA optimizers (bitsandbytes'
``paged_adamw_8bit``, torchao's ``adamw_torch_8bit``) and under TRL's SFTTrainer: it trains, and
a resume from a checkpoint equals the uninterrupted run. Needs the ``qlora`` extra."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'reflora[qlora]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'reflora[qlora]')")
peft = pytest.importorskip("peft", reason="needs peft (pip install 'reflora[qlora]')")

from reflora.integrations.transformers import STATE_FILE, RefLoRACallback  # noqa: E402
from reflora.lowbit import LowBitTransport  # noqa: E402
from reflora.transport import get_state_transport  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]


def _model(hidden=32, r=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, attention_dropout=0.0,
    )
    base = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))


def _args(cls, out, optim, max_steps=6, **kw):
    return cls(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        max_grad_norm=1.0, optim=optim, lr_scheduler_type="constant", **kw,
    )


def _tokens(n=24, seq=12):
    """Four sequences, repeated: learnable in a few steps."""
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 64, (4, seq), generator=g)
    return [{"input_ids": seqs[i % 4], "labels": seqs[i % 4].clone()} for i in range(n)]


def _trained(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


def _check_resume(make, tmp_path, want_transport_lowbit=True):
    """Train 6 steps (checkpoint at 3), then resume from step 3: the same factors."""
    cb = RefLoRACallback(variant="full", space="auto")
    trainer = make(tmp_path / "run", cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    ckpt = tmp_path / "run" / "checkpoint-3"
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert state["step_count"] == 3 and state["space"] == "parameter"
    assert isinstance(get_state_transport(trainer.optimizer.optimizer), LowBitTransport) == want_transport_lowbit
    final = _trained(trainer)

    resumed = make(tmp_path / "run", RefLoRACallback(variant="full", space="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(resume_from_checkpoint=str(ckpt))
    got = _trained(resumed)
    assert final.keys() == got.keys()
    for k in final:
        assert torch.allclose(final[k], got[k], rtol=1e-5, atol=1e-7), k
    return trainer


@pytest.mark.slow
def test_trainer_paged_adamw_8bit_trains_and_resumes_identically(tmp_path) -> None:
    # hidden 256, r = 16: every factor has 4096 elements, bitsandbytes' min_8bit_size: 8-bit state
    def make(out, cb):
        args = _args(transformers.TrainingArguments, out, "paged_adamw_8bit")
        return transformers.Trainer(model=_model(hidden=256, r=16), args=args, train_dataset=_tokens(), callbacks=[cb])

    trainer = _check_resume(make, tmp_path)
    opt = trainer.optimizer.optimizer  # Trainer builds bitsandbytes' AdamW with optim_bits=8, is_paged=True
    assert type(opt).__module__.startswith("bitsandbytes") and opt.args.optim_bits == 8 and opt.is_paged
    assert {opt.state[p]["state1"].dtype for g in opt.param_groups for p in g["params"]} == {torch.uint8}


@pytest.mark.slow
@pytest.mark.compile  # torchao compiles its step per parameter shape (about a minute on 2 cores)
def test_trainer_adamw_torch_8bit_trains_and_resumes_identically(tmp_path) -> None:
    pytest.importorskip("torchao", reason="needs torchao (pip install 'reflora[qlora]')")

    # hidden 256, r = 16: every factor has 4096 elements, so torchao quantizes its state
    def make(out, cb):
        args = _args(transformers.TrainingArguments, out, "adamw_torch_8bit", max_steps=6)
        return transformers.Trainer(model=_model(hidden=256, r=16), args=args, train_dataset=_tokens(), callbacks=[cb])

    trainer = _check_resume(make, tmp_path)
    opt = trainer.optimizer.optimizer
    assert type(opt).__name__ == "AdamW8bit" and type(opt).__module__.startswith("torchao")
    states = [opt.state[p]["exp_avg"] for g in opt.param_groups for p in g["params"] if p in opt.state]
    assert states and all(type(s).__name__ == "OptimState8bit" for s in states)


def _word_tokenizer():
    """A word-level tokenizer made here (nothing downloaded): 60 words, pad and eos."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


@pytest.mark.slow
def test_sft_trainer_trains_and_resumes_identically(tmp_path) -> None:
    trl = pytest.importorskip("trl", reason="needs trl (pip install 'reflora[qlora]')")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, 60, (10,), generator=g)) for _ in range(4)] * 6
    data = datasets.Dataset.from_dict({"text": texts})
    tok = _word_tokenizer()

    def make(out, cb):
        args = _args(trl.SFTConfig, out, "paged_adamw_8bit", max_length=16, packing=False)
        return trl.SFTTrainer(model=_model(), args=args, train_dataset=data, processing_class=tok, callbacks=[cb])

    trainer = _check_resume(make, tmp_path)
    assert isinstance(trainer, trl.SFTTrainer)
