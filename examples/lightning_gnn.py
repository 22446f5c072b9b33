"""LoRA + RefLoRA on a torch-geometric GNN, trained with PyTorch Lightning.

Node classification on Zachary's karate club (ships with torch-geometric). The LoRA goes into
every linear map of the PyG layers (``reflora.adapters.pyg.add_lora``); RefLoRA is one callback.

    python examples/lightning_gnn.py [--steps 100] [--log-dir DIR] [--devices 2 --strategy ddp]
"""

import argparse
import tempfile

import pytorch_lightning as pl
import torch
from torch_geometric.datasets import KarateClub
from torch_geometric.nn import GATConv, GCNConv

from reflora.adapters.pyg import add_lora
from reflora.integrations.lightning import RefLoRACallback

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100)
p.add_argument("--log-dir", default=None, help="CSV logs (default: a temporary folder)")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--strategy", default="auto")
args = p.parse_args()

data = KarateClub()[0]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GCNConv(data.num_features, 16)
        self.conv2 = GATConv(16, 8, heads=2)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, edge_index):
        h = torch.relu(self.conv1(x, edge_index))
        return self.head(torch.relu(self.conv2(h, edge_index)))


class NodeClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = add_lora(Net(), r=4, trainable=("head",))  # LoRA on the linear maps inside the convs

    def training_step(self, batch, batch_idx):
        out = self.model(batch.x, batch.edge_index)
        loss = torch.nn.functional.cross_entropy(out[batch.train_mask], batch.y[batch.train_mask])
        acc = (out.argmax(-1) == batch.y).float().mean()
        self.log_dict({"loss": loss, "accuracy": acc}, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([q for q in self.parameters() if q.requires_grad], lr=1e-2)


# one graph, one batch per step: a loader that yields it every time
loader = torch.utils.data.DataLoader([data] * args.steps, batch_size=None, collate_fn=lambda d: d)
callback = RefLoRACallback(log_diagnostics=True)  # attach's defaults; its diagnostics go to the logger
log_dir = args.log_dir or tempfile.mkdtemp(prefix="lightning_gnn_")
trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                     logger=pl.loggers.CSVLogger(log_dir), log_every_n_steps=max(1, args.steps // 10),
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     callbacks=[callback])
module = NodeClassifier()
trainer.fit(module, loader)
if trainer.global_rank == 0:
    handle = callback.handle
    print(f"{len(handle.pairs)} LoRA pairs, space={handle.space}, RefLoRA steps: {handle.step_count}")
    with torch.no_grad():
        out = module.model(data.x, data.edge_index)
    print(f"final loss {trainer.callback_metrics['loss']:.3f}, accuracy on all nodes: "
          f"{(out.argmax(-1) == data.y).float().mean():.3f}; logs in {log_dir}")
