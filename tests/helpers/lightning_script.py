"""A Lightning run with RefLoRA's callback, for the Lightning tests (run as a script: Lightning's
DDP and ModelParallel strategies relaunch it once per process).

``python tests/helpers/lightning_script.py OUT [--strategy single|ddp|ddp_spawn|fsdp2] [--devices N]
[--steps S] [--precision P] [--accumulate K] [--manual] [--ckpt-dir D] [--resume CKPT]
[--optimizer sgd|adamw] [--no-reflora]`` trains a two-layer LoRA model in float64 (float32 for
mixed precision) on a fixed dataset and saves, from rank 0, ``{"factors": {name: tensor},
"ranks": [factors of every rank], "step_count": int, "logged": {...}}`` to ``OUT``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import pytorch_lightning as pl

from reflora.integrations.lightning import RefLoRACallback

GLOBAL_BATCH = 8


class LoRALinear(nn.Module):
    def __init__(self, m: int, n: int, r: int, g: torch.Generator, dtype) -> None:
        super().__init__()
        self.base = nn.Linear(m, n, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(n, m, generator=g, dtype=dtype) / m**0.5)
            self.base.bias.zero_()
        self.lora_A = nn.Parameter(torch.randn(r, m, generator=g, dtype=dtype) / m**0.5)
        self.lora_B = nn.Parameter(torch.randn(n, r, generator=g, dtype=dtype) * 0.05)

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


class Net(nn.Module):
    def __init__(self, dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l0 = LoRALinear(16, 24, 4, g, dtype)
        self.l1 = LoRALinear(24, 6, 4, g, dtype)

    def forward(self, x):
        return self.l1(torch.tanh(self.l0(x)))


def data(dtype, n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g, dtype=dtype)
    return torch.utils.data.TensorDataset(x, torch.sin(x[:, :6] * 2) + 0.1 * x[:, 6:12])


class Module(pl.LightningModule):
    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.net = Net(torch.float32 if "mixed" in args.precision else torch.float64)
        self.automatic_optimization = not args.manual

    def configure_model(self) -> None:
        if self.args.strategy != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.l0, self.net.l1):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        if self.args.manual:
            opt = self.optimizers()
            self.manual_backward(loss / self.args.accumulate)
            if (batch_idx + 1) % self.args.accumulate == 0:
                opt.step()
                opt.zero_grad()
                self.lr_schedulers().step()  # manual optimisation steps its schedulers itself
        return loss

    def train_dataloader(self):
        # rank r takes samples r, r + world, ...: a step of every rank together sees the single
        # process's batch (Lightning's own distributed sampler would shuffle)
        ds = data(self.net.l0.lora_A.dtype, getattr(self.args, "samples", 64))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.args.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        else:
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--strategy", default="single", choices=["single", "ddp", "ddp_spawn", "fsdp2"])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", default="64-true")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--manual", action="store_true")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--no-reflora", action="store_true")
    args = ap.parse_args()
    if "mixed" in args.precision and args.precision == "64-true":
        raise SystemExit("bad precision")
    torch.set_num_threads(1)
    strategy = {"single": "auto", "ddp": "ddp", "ddp_spawn": "ddp_spawn"}.get(args.strategy)
    if args.strategy == "fsdp2":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
    callbacks = [] if args.no_reflora else [RefLoRACallback(warmup_steps=1, log_diagnostics=True)]
    if args.ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.steps,
                                                      save_top_k=-1, filename="step{step}"))
    module = Module(args)
    logged: dict = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reflora/")})

    precision = "32-true" if args.precision == "64-true" else args.precision  # float64 is the module's dtype
    trainer = pl.Trainer(
        max_steps=args.steps if args.resume is None else 2 * args.steps, accelerator="cpu", devices=args.devices,
        strategy=strategy, precision=precision, accumulate_grad_batches=1 if args.manual else args.accumulate,
        logger=False, enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[*callbacks, Keep()], log_every_n_steps=1, default_root_dir=args.ckpt_dir or os.getcwd(),
    )
    trainer.fit(module, ckpt_path=args.resume)
    factors = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in module.net.named_parameters() if p.requires_grad}
    ranks = [factors]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, factors)
    if trainer.global_rank == 0:
        cb = next((c for c in trainer.callbacks if isinstance(c, RefLoRACallback)), None)
        torch.save({"factors": factors, "ranks": ranks, "logged": logged,
                    "step_count": None if cb is None else cb.handle.step_count}, args.out)


if __name__ == "__main__":
    sys.exit(main())
