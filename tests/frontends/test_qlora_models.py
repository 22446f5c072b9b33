"""PEFT LoRA on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases: the QLoRA recipe on a tiny Llama.

The model is built from a config, saved to a temporary folder and loaded back through
``BitsAndBytesConfig`` (nothing is downloaded), then ``prepare_model_for_kbit_training`` with
gradient checkpointing and PEFT ``all-linear``, trained with bitsandbytes' AdamW8bit (its
``min_8bit_size`` lowered so that the tiny factors reach both state branches).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'reflora[qlora]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'reflora[qlora]')")
peft = pytest.importorskip("peft", reason="needs peft (pip install 'reflora[qlora]')")

import bitsandbytes as bnb  # noqa: E402

import reflora  # noqa: E402
from reflora.adapters import find_pairs  # noqa: E402

from attach_helpers import MODE_IDS, MODES  # noqa: E402

QUANT = {
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _qlora(folder, quant: str, checkpointing: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=transformers.BitsAndBytesConfig(**QUANT[quant]), device_map="cpu",
            dtype=torch.float32,
        )
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    torch.manual_seed(1)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _frozen_bits(model) -> dict[str, torch.Tensor]:
    """Every quantized base weight's storage (and its 4-bit absmax / 8-bit row scales)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            out[name] = mod.weight.data.clone()
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None:
                out[name + ".absmax"] = qs.absmax.clone()
            scb = getattr(mod.weight, "SCB", None)
            if scb is not None:
                out[name + ".SCB"] = scb.clone()
    return out


def _train(model, variant=None, space=None, steps=3, lr=2e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=512)
    handle = None if variant is None else reflora.attach(opt, find_pairs(model), variant=variant, space=space)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model.train()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MatMul8bitLt's cast notice
        for _ in range(steps):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(float(loss))
    return opt, handle, losses, ids


def _deltas(model):
    return [(p.B @ p.A).detach().clone() for p in find_pairs(model)]


@pytest.mark.slow
@pytest.mark.parametrize("quant", sorted(QUANT))
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_qlora_base_trains_in_every_mode(checkpoint, quant, variant, space) -> None:
    """Every base (nf4 / fp4 with float32 or bfloat16 compute, int8) in every mode, with gradient
    checkpointing: it trains, a refactor-only step keeps every ``B A``, the quantized base is
    untouched bit for bit."""
    model = _qlora(checkpoint, quant)
    pairs = find_pairs(model)
    assert len(pairs) == 7  # q, k, v, o, gate, up, down of the one layer
    frozen = _frozen_bits(model)
    assert len(frozen) == 14  # 7 quantized layers, each with its 4-bit absmax or 8-bit row scales
    opt, handle, losses, ids = _train(model, variant, space)
    assert handle.space == space and handle.step_count == 3
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    state_dtypes = {opt.state[p]["state1"].dtype for pair in pairs for p in (pair.A, pair.B)}
    assert state_dtypes == {torch.float32, torch.uint8}  # both of bitsandbytes' branches in use
    # a refactor-only step (lr = 0) keeps every B A
    before = _deltas(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for d0, d1 in zip(before, _deltas(model)):
        assert torch.allclose(d0, d1, atol=1e-5 * float(d0.abs().max()) + 1e-9)
    for key, value in _frozen_bits(model).items():  # the quantized base, bit for bit
        assert torch.equal(value, frozen[key]), key


def _merge_error(model, ids) -> float:
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        got = merged(input_ids=ids).logits
    return float((got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("quant", sorted(QUANT))
def test_qlora_merge_after_refactoring_is_as_good_as_without(checkpoint, quant) -> None:
    """merge_and_unload into the quantized base after RefLoRA (full, parameter space): the merged
    model's outputs differ from the adapter model's by at most 2x what merging the adapter
    trained the same way without RefLoRA gives (merging re-quantizes W + B A). Gradient
    checkpointing (tested above) is off here: it changes nothing merged, and halves the time."""
    errors = {}
    for use in (False, True):
        model = _qlora(checkpoint, quant, checkpointing=False)
        frozen = _frozen_bits(model)
        _, handle, losses, ids = _train(model, *(("full", "parameter") if use else (None, None)), steps=2)
        assert all(torch.isfinite(torch.tensor(losses)))
        for key, value in _frozen_bits(model).items():
            assert torch.equal(value, frozen[key]), key
        if handle is not None:
            handle.remove()
        errors[use] = _merge_error(model, ids)
    assert errors[True] <= 2 * errors[False] + 1e-6, errors
