"""Low-bit optimizers for the QLoRA tests: which ones, how to build them, how to give them state.

Needs the ``qlora`` extra (bitsandbytes, torchao); the test modules skip without it.
"""

from __future__ import annotations

import warnings

import torch

# name -> (package, class name, constructor kwargs)
BNB = {
    "AdamW8bit": {}, "Adam8bit": {}, "PagedAdamW8bit": {}, "PagedAdamW": {}, "Lion8bit": {}, "AdEMAMix8bit": {},
}
TORCHAO = {"AdamW8bit": {}, "AdamW4bit": {}, "AdamWFp8": {}}
# (package, name) for parametrize, ids "bnb-AdamW8bit", "torchao-AdamW4bit"
ALL = [("bnb", n) for n in BNB] + [("torchao", n) for n in TORCHAO]
IDS = [f"{pkg}-{name}" for pkg, name in ALL]


def make(pkg: str, name: str, params, lr: float = 1e-3, **kw) -> torch.optim.Optimizer:
    if pkg == "bnb":
        import bitsandbytes as bnb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
            return getattr(bnb.optim, name)(params, lr=lr, **{**BNB[name], **kw})
    import torchao.optim

    return getattr(torchao.optim, name)(params, lr=lr, **{**TORCHAO[name], **kw})


def fill_state(opt: torch.optim.Optimizer, pkg: str, params, seed: int = 0) -> None:
    """Give every parameter Adam-like state as the optimizer itself would store it.

    bitsandbytes: two real steps on random gradients (no compilation there). torchao: its
    steps compile (minutes on 2 cores), so the state is made the way its first step makes it
    (``_new_buffer``: the quantized subclass at or above its size threshold, a plain tensor
    below) and filled with moments of random gradients through the subclasses' quantizing
    ``copy_``.
    """
    g = torch.Generator().manual_seed(seed)
    if pkg == "bnb":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape[0], 1, generator=g))
                opt.step()
        return
    for p in params:
        grads = torch.randn(8, *p.shape, generator=g) * (1 + torch.rand(p.shape[0], 1, generator=g))
        st = opt.state[p]
        st["step"] = torch.tensor(8.0)
        st["exp_avg"] = opt._new_buffer(p, True)  # torchao's own choice of storage for p
        st["exp_avg_sq"] = opt._new_buffer(p, False)
        st["exp_avg"].copy_(grads.mean(0))
        st["exp_avg_sq"].copy_(grads.square().mean(0))
