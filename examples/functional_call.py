"""Drive reflora.functional directly from a torch.func.functional_call training loop.

No optimizer object, no hooks: parameters live in a dict, gradients come from torch.func.grad,
and the RefLoRA-preconditioned step is a few lines. All pairs of a shape are refactored in one
batched call (vmap would do too).

    python examples/functional_call.py [--steps 200]
"""

import argparse

import torch
from torch import nn
from torch.func import functional_call, grad

from reflora.functional import precondition

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=200)
args = p.parse_args()

torch.manual_seed(0)
n_layers, d, r = 3, 48, 4


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.W0 = nn.Parameter(torch.randn(n_layers, d, d) / d**0.5, requires_grad=False)
        self.A = nn.Parameter(torch.randn(n_layers, r, d) / d**0.5)  # stacked: pair i is (A[i], B[i])
        self.B = nn.Parameter(torch.zeros(n_layers, d, r))

    def forward(self, x):
        for W0, A, B in zip(self.W0, self.A, self.B):
            x = torch.tanh(x @ (W0 + B @ A).T)
        return x


model = Model()
params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
buffers = {"W0": model.W0.detach()}
x = torch.randn(256, d)
target = torch.tanh(x @ torch.randn(d, d).T / d**0.5)


def loss_fn(params):
    out = functional_call(model, {**params, **buffers}, (x,))
    return (out - target).square().mean()


lr = 0.5
for step in range(args.steps):
    g = grad(loss_fn)(params)
    # one batched call for all three pairs: grad_A <- S^-1 grad_A, grad_B <- grad_B S
    gA, gB = precondition(params["A"], params["B"], g["A"], g["B"], variant="full")
    params = {"A": params["A"] - lr * gA, "B": params["B"] - lr * gB}
    if step % max(1, args.steps // 5) == 0:
        print(f"step {step:4d}  loss {loss_fn(params).item():.4f}")
print(f"final loss {loss_fn(params).item():.4f}")
