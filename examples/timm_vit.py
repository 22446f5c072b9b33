"""A timm ViT with LoRA (PEFT) and RefLoRA on scikit-learn's bundled digits images.

Transfer set-up: a small ViT is first trained (all weights) on digits 0-4, standing in for a
pretrained backbone; LoRA + RefLoRA then adapt it to digits 5-9 with a new head.

    python examples/timm_vit.py [--steps 100] [--pretrain-steps 200]
"""

import argparse

import timm
import torch
from peft import LoraConfig, get_peft_model
from sklearn.datasets import load_digits

import reflora
from reflora.adapters.timm import vit_target_modules

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100)
p.add_argument("--pretrain-steps", type=int, default=200)
args = p.parse_args()

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
y = torch.tensor(digits.target)
test = torch.arange(len(y)) % 4 == 0

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                        embed_dim=64, depth=4, num_heads=4, num_classes=5)

# 1. the "pretrained" backbone: all weights trained on digits 0-4
old = ((y < 5) & ~test).nonzero().flatten()
pre = torch.optim.AdamW(vit.parameters(), lr=2e-3)
for _ in range(args.pretrain_steps):
    idx = old[torch.randint(len(old), (64,))]
    loss = torch.nn.functional.cross_entropy(vit(x[idx]), y[idx])
    pre.zero_grad()
    loss.backward()
    pre.step()

# 2. LoRA on the attention / MLP linear maps (the helper proposes them) + a new head for 5-9
vit.reset_classifier(5)
y = y - 5  # labels of the new task (only digits 5-9 are used below)
new = y >= 0
model = get_peft_model(vit, LoraConfig(r=4, lora_alpha=8, target_modules=vit_target_modules(vit), modules_to_save=["head"]))

opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-3)
handle = reflora.attach(opt, model, variant="full", space="parameter")
print(handle)

train = (new & ~test).nonzero().flatten()
for step in range(args.steps):
    idx = train[torch.randint(len(train), (64,))]
    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(1, args.steps // 5) == 0:
        print(f"step {step:4d}  loss {loss.item():.3f}")
held_out = new & test
with torch.no_grad():
    acc = (model(x[held_out]).argmax(-1) == y[held_out]).float().mean()
print(f"held-out accuracy on digits 5-9: {acc:.3f}")
