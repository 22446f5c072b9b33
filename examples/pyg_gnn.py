"""LoRA + RefLoRA on a torch-geometric GNN (PEFT does not wrap PyG layers; reflora does).

Node classification on Zachary's karate club (ships with torch-geometric).

    python examples/pyg_gnn.py [--steps 100]
"""

import argparse

import torch
from torch_geometric.datasets import KarateClub
from torch_geometric.nn import GATConv, GCNConv

import reflora
from reflora.adapters.pyg import add_lora, merge_lora

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100)
args = p.parse_args()

data = KarateClub()[0]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GCNConv(-1, 16)  # lazily initialised: works, run one forward first
        self.conv2 = GATConv(16, 8, heads=2)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, edge_index):
        h = torch.relu(self.conv1(x, edge_index))
        return self.head(torch.relu(self.conv2(h, edge_index)))


torch.manual_seed(0)
model = add_lora(Net(), r=4, trainable=("head",))  # LoRA on every linear map inside the convs
model(data.x, data.edge_index)  # materialise the lazy layer before building the optimizer

opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
handle = reflora.attach(opt, model, variant="full", space="gradient")
print(f"{len(handle.pairs)} LoRA pairs: {[q.name for q in handle.pairs]}")

for step in range(args.steps):
    out = model(data.x, data.edge_index)
    loss = torch.nn.functional.cross_entropy(out[data.train_mask], data.y[data.train_mask])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(1, args.steps // 5) == 0:
        print(f"step {step:4d}  loss {loss.item():.3f}")

with torch.no_grad():
    before = model(data.x, data.edge_index)
    merged = merge_lora(model)  # fold W + s B A back into the PyG layers
    print("merged output matches:", torch.allclose(before, merged(data.x, data.edge_index), atol=1e-5))
    print(f"accuracy on all nodes: {(before.argmax(-1) == data.y).float().mean():.3f}")
