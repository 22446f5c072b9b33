"""A timm ViT with PEFT LoRA and RefLoRA, trained with PyTorch Lightning.

Scikit-learn's bundled digits images (8 x 8). A small ViT is first trained on digits 0-4,
standing in for a pretrained backbone; LoRA then adapts it to digits 5-9 with a new head, in a
``LightningModule``. RefLoRA is one callback; resuming with ``--resume CKPT`` continues its step
counter (the checkpoint holds its state).

    python examples/lightning_vit.py [--steps 100] [--pretrain-steps 200] [--precision bf16-mixed]
        [--ckpt-dir DIR] [--resume CKPT]
"""

import argparse
import tempfile

import pytorch_lightning as pl
import timm
import torch
from peft import LoraConfig, get_peft_model
from sklearn.datasets import load_digits

from reflora.adapters.timm import vit_target_modules
from reflora.integrations.lightning import RefLoRACallback

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100)
p.add_argument("--pretrain-steps", type=int, default=200)
p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed or 16-mixed")
p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation (batches per optimizer step)")
p.add_argument("--ckpt-dir", default=None, help="save a checkpoint at the end of training here")
p.add_argument("--resume", default=None, help="a checkpoint to resume from (train up to --steps in all)")
args = p.parse_args()

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
y = torch.tensor(digits.target)
test = torch.arange(len(y)) % 4 == 0

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                        embed_dim=64, depth=4, num_heads=4, num_classes=5)
old = ((y < 5) & ~test).nonzero().flatten()
pre = torch.optim.AdamW(vit.parameters(), lr=2e-3)
for _ in range(args.pretrain_steps):  # the "pretrained" backbone: all weights, digits 0-4
    idx = old[torch.randint(len(old), (64,))]
    loss = torch.nn.functional.cross_entropy(vit(x[idx]), y[idx])
    pre.zero_grad()
    loss.backward()
    pre.step()
vit.reset_classifier(5)


class DigitsFiveToNine(pl.LightningModule):
    def __init__(self):
        super().__init__()
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=vit_target_modules(vit), modules_to_save=["head"])
        self.model = get_peft_model(vit, cfg)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = torch.nn.functional.cross_entropy(self.model(images), labels)
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_accuracy", (self.model(images).argmax(-1) == labels).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW([q for q in self.parameters() if q.requires_grad], lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


new = y >= 5
train = torch.utils.data.TensorDataset(x[new & ~test], y[new & ~test] - 5)
held_out = torch.utils.data.TensorDataset(x[new & test], y[new & test] - 5)
g = torch.Generator().manual_seed(0)
loaders = (torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=g),
           torch.utils.data.DataLoader(held_out, batch_size=256))
callbacks = [RefLoRACallback(log_diagnostics=True)]  # space="auto": parameter space under AdamW
if args.ckpt_dir:
    callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, filename="last", save_last=False,
                                                  every_n_train_steps=args.steps))
trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, precision=args.precision,
                     accumulate_grad_batches=args.accumulate, val_check_interval=None, check_val_every_n_epoch=1,
                     logger=pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="lightning_vit_")),
                     log_every_n_steps=max(1, args.steps // 10), enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(args.ckpt_dir), callbacks=callbacks)
module = DigitsFiveToNine()
trainer.fit(module, *loaders, ckpt_path=args.resume)
print(callbacks[0].handle)
final_loss = float(trainer.callback_metrics["loss"])
metrics = trainer.validate(module, loaders[1], verbose=False)[0]
print(f"final loss {final_loss:.3f}, held-out accuracy on digits 5-9: {metrics['val_accuracy']:.3f}")
