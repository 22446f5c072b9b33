"""Shared fixtures for the optimizer-attachment tests: a tiny multi-pair least-squares model."""

from __future__ import annotations

import torch
from torch import nn

import reflora

MODES = [("full", "gradient"), ("scalar", "parameter"), ("full", "parameter"), ("scalar", "gradient")]
MODE_IDS = [f"{v}-{s}" for v, s in MODES]


def _adafactor(params, lr):
    return torch.optim.Adafactor(params, lr=lr)


OPTIMIZERS = {
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "Adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "AdamW": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
    "AdamW-amsgrad": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, amsgrad=True, weight_decay=0.0),
    "RMSprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5, centered=True),
    "Adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "Adafactor": _adafactor,
}
# learning rates that make every optimizer train the problem below in a few dozen steps
# (the loss floor of the rank-4 fit is ~0.4 of the initial loss)
LR = {"SGD": 0.3, "Adam": 2e-2, "AdamW": 2e-2, "AdamW-amsgrad": 2e-2, "RMSprop": 5e-3, "Adagrad": 1e-1, "Adafactor": 1.0}


class LoRANet(nn.Module):
    """Three LoRA'd linear maps of two shapes (two groups), PEFT-style init: A random, B = 0."""

    def __init__(self, dims=((24, 16), (24, 16), (16, 24)), r: int = 4, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.W0 = [torch.randn(n, m, generator=g, dtype=dtype) / m**0.5 for m, n in dims]
        self.targets = [torch.randn(n, m, generator=g, dtype=dtype) / m**0.5 for m, n in dims]
        self.X = [torch.randn(64, m, generator=g, dtype=dtype) for m, _ in dims]
        for m, n in dims:
            self.A.append(nn.Parameter((torch.rand(r, m, generator=g, dtype=dtype) - 0.5) * 2 / m**0.5))
            self.B.append(nn.Parameter(torch.zeros(n, r, dtype=dtype)))

    def pairs(self):
        return list(zip(self.A, self.B))

    def outputs(self) -> list[torch.Tensor]:
        return [x @ (w0 + b @ a).T for x, w0, a, b in zip(self.X, self.W0, self.A, self.B)]

    def loss(self) -> torch.Tensor:
        return sum(
            0.5 * (out - x @ (w0 + t).T).square().mean()
            for out, x, w0, t in zip(self.outputs(), self.X, self.W0, self.targets)
        )

    def deltas(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [b @ a for a, b in zip(self.A, self.B)]


def train(net: LoRANet, opt, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = net.loss()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def setup(opt_name: str, variant: str, space: str, seed: int = 0, **kw):
    net = LoRANet(seed=seed)
    opt = OPTIMIZERS[opt_name](list(net.parameters()), LR[opt_name])
    handle = reflora.attach(opt, net.pairs(), variant=variant, space=space, **kw)
    return net, opt, handle
