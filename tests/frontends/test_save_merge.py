"""After RefLoRA training, the adapter is an ordinary PEFT adapter: ``save_pretrained`` reloaded
with ``PeftModel.from_pretrained`` and ``merge_and_unload`` give the adapter model's outputs, in
every mode (docs/getting-started.md, "Save, merge, export")."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import reflora  # noqa: E402

MODES = [("full", "parameter"), ("full", "gradient"), ("scalar", "parameter"), ("scalar", "gradient")]


def _base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("variant,space", MODES, ids=[f"{v}-{s}" for v, s in MODES])
def test_save_pretrained_and_merge_after_reflora_training(tmp_path, variant, space) -> None:
    base = _base()
    pristine = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"])
    model = peft.get_peft_model(base, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    # resolved=0.0: act at every step (the default gate would leave a pair alone while its
    # spectrum is unresolved, and the point here is factors RefLoRA has rewritten)
    handle = reflora.attach(opt, model, variant=variant, space=space, resolved=0.0)
    assert handle.space == space and len(handle.pairs) == 4  # embedding, q, v, up

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    before = _logits(model, ids)
    for _ in range(6):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert handle.step_count == 6
    model.eval()
    trained = _logits(model, ids)
    scale = trained.abs().max()
    assert (trained - before).abs().max() > 1e-3 * scale  # training moved the adapter: not vacuous

    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # the adapter weights only
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=0, atol=1e-6 * scale)

    handle.remove()
    merged = model.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=0, atol=1e-5 * scale)
