"""A plain PyTorch loop with torch.compile and RefLoRA: compiled model and compiled optimizer step.

loralib-style LoRA layers written by hand; reflora finds them by structure. The optimizer step is
compiled with PyTorch's compiled-optimizer recipe; RefLoRA's hooks are traced into it and do not
recompile from step to step (its r x r kernel then runs every step).

    python examples/compile_loop.py [--steps 50]
"""

import argparse
import math

import torch
from torch import nn

import reflora

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=50)
args = p.parse_args()


class LoRALinear(nn.Module):
    def __init__(self, m, n, r=4, alpha=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m) / math.sqrt(m), requires_grad=False)  # frozen W0
        self.lora_A = nn.Parameter(torch.empty(r, m))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n, r))  # PEFT's init: B = 0, no warmup needed
        self.scaling = alpha / r

    def forward(self, x):
        return x @ self.weight.T + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


torch.manual_seed(0)
model = nn.Sequential(LoRALinear(32, 64), nn.GELU(), LoRALinear(64, 64), nn.GELU(), LoRALinear(64, 8))
teacher = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
handle = reflora.attach(opt, model, variant="full", space="parameter", warmup_steps=2, interval=2)
step_model = torch.compile(model)


@torch.compile(fullgraph=False)  # torch.optim breaks the graph around step() itself
def opt_step():
    opt.step()


for step in range(args.steps):
    x = torch.randn(128, 32)
    with torch.no_grad():
        y = teacher(x)
    loss = (step_model(x) - y).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt_step()
    if step % max(1, args.steps // 5) == 0:
        print(f"step {step:4d}  loss {loss.item():.4f}")
print(f"final loss {loss.item():.4f}  (RefLoRA steps counted: {handle.step_count})")
