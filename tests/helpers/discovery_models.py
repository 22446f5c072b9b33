"""Tiny models of every family discovery supports, built from configs (nothing downloaded).

Each family returns a ``Case``: the model, a function computing its output on a fixed batch, a
loss, the pairs the finders must return (names and (r, m, n) shapes) and, where the family's
library has one, a merge function.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from reflora.adapters import mark_pair


def has(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


@dataclass
class Case:
    model: nn.Module
    output: Callable[[nn.Module], torch.Tensor]
    loss: Callable[[nn.Module], torch.Tensor]
    expected: dict[str, tuple[int, int, int]]  # pair name -> (r, m, n)
    merge: Callable[[nn.Module], nn.Module] | None = None
    find_kwargs: dict | None = None
    example_inputs: Any = None  # what ``output`` calls the model with (for traced discovery)


def _peft(model, **cfg):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**cfg))


def _lm_case(model, vocab, expected, seq=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, seq), generator=g)
    return Case(
        model,
        output=lambda m: m(input_ids=ids).logits,
        loss=lambda m: m(input_ids=ids, labels=ids).loss,
        expected=expected,
        merge=lambda m: m.merge_and_unload(),
        example_inputs={"input_ids": ids},
    )


def llama(**lora) -> Case:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = _peft(transformers.LlamaForCausalLM(cfg), r=4, lora_alpha=8,
                  target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"], **lora)
    exp = {"base_model.model.model.embed_tokens.default": (4, 48, 32)}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}"
        exp[f"{pre}.self_attn.q_proj.default"] = (4, 32, 32)
        exp[f"{pre}.self_attn.v_proj.default"] = (4, 32, 16)
        exp[f"{pre}.mlp.up_proj.default"] = (4, 32, 40)
    if lora.get("use_dora"):  # PEFT's DoRA does not support embeddings; we target Linear only
        pass
    return _lm_case(model, 48, exp)


def llama_dora() -> Case:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = _peft(transformers.LlamaForCausalLM(cfg), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                  use_dora=True)
    exp = {}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}.self_attn"
        exp[f"{pre}.q_proj.default"] = (4, 32, 32)
        exp[f"{pre}.v_proj.default"] = (4, 32, 16)
    return _lm_case(model, 48, exp)


def llama_rslora() -> Case:
    return llama(use_rslora=True)


def gpt2() -> Case:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _peft(transformers.GPT2LMHeadModel(cfg), r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    exp = {}
    for i in range(2):
        exp[f"base_model.model.transformer.h.{i}.attn.c_attn.default"] = (4, 32, 96)
        exp[f"base_model.model.transformer.h.{i}.mlp.c_fc.default"] = (4, 32, 128)
    return _lm_case(model, 48, exp)


def _encoder(model_cls, cfg, targets, names):
    torch.manual_seed(0)
    model = _peft(model_cls(cfg), r=4, target_modules=targets)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 10), generator=g)
    labels = torch.tensor([0, 1, 1, 0])
    exp = {n: (4, 32, 32) for n in names}
    return Case(
        model,
        output=lambda m: m(input_ids=ids).logits,
        loss=lambda m: m(input_ids=ids, labels=labels).loss,
        expected=exp,
        merge=lambda m: m.merge_and_unload(),
        example_inputs={"input_ids": ids},
    )


def bert() -> Case:
    import transformers

    cfg = transformers.BertConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2)
    names = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{t}.default" for i in range(2) for t in ("query", "value")]
    return _encoder(transformers.BertForSequenceClassification, cfg, ["query", "value"], names)


def deberta_v2() -> Case:
    import transformers

    cfg = transformers.DebertaV2Config(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       num_labels=2, max_position_embeddings=32)
    names = [f"base_model.model.deberta.encoder.layer.{i}.attention.self.{t}.default" for i in range(2) for t in ("query_proj", "value_proj")]
    return _encoder(transformers.DebertaV2ForSequenceClassification, cfg, ["query_proj", "value_proj"], names)


# MoE families: transformers 5 stores the experts of a layer as 3-D parameters, (E, out, in) for
# Mixtral (PEFT swaps in/out) and (E, in, out) for GPT-OSS (``is_transposed``, no swap). PEFT
# wraps each targeted parameter in a ParamWrapper with E-stacked lora_A / lora_B; two targeted
# parameters of one experts module nest (the inner wrapper is ``experts.base_layer``). The
# expected shapes are per expert; ``MOE_EXPERTS`` says which pairs stack how many experts.
MOE_EXPERTS = 4


def mixtral() -> Case:
    """Mixtral + ``target_modules="all-linear"``: attention and router are Linear / 2-D
    ParamWrapper pairs, the experts' ``gate_up_proj`` (rank 2r: PEFT doubles the rank of fused
    projections) and ``down_proj`` are ParamWrappers with 4 experts."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=48, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=MOE_EXPERTS, num_experts_per_tok=2)
    model = _peft(transformers.MixtralForCausalLM(cfg), r=4, target_modules="all-linear")
    exp = {}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}"
        exp.update({f"{pre}.self_attn.q_proj.default": (4, 32, 32), f"{pre}.self_attn.k_proj.default": (4, 32, 16),
                    f"{pre}.self_attn.v_proj.default": (4, 32, 16), f"{pre}.self_attn.o_proj.default": (4, 32, 32),
                    f"{pre}.mlp.gate.default": (4, 32, MOE_EXPERTS),  # the router, a 2-D ParamWrapper
                    f"{pre}.mlp.experts.default": (4, 16, 32),  # down_proj, per expert
                    f"{pre}.mlp.experts.base_layer.default": (8, 32, 32)})  # gate_up_proj, per expert
    return _lm_case(model, 48, exp)


def gpt_oss() -> Case:
    """GPT-OSS + ``target_parameters`` on the experts (``all-linear`` does not reach them): the
    stored weights are (E, in, out), so PEFT's update is ``(B_e A_e)^T``."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=48, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    num_local_experts=MOE_EXPERTS, num_experts_per_tok=2)
    model = _peft(transformers.GptOssForCausalLM(cfg), r=4, target_modules=["q_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    exp = {}
    for i in range(2):
        pre = f"base_model.model.model.layers.{i}"
        exp.update({f"{pre}.self_attn.q_proj.default": (4, 32, 32),
                    f"{pre}.mlp.experts.default": (4, 16, 32),  # down_proj
                    f"{pre}.mlp.experts.base_layer.default": (4, 32, 32)})  # gate_up_proj
    return _lm_case(model, 48, exp)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x1, x2, x3):
        return torch.cat([self.c1(x1).flatten(1), self.c2(x2).flatten(1), self.c3(x3).flatten(1)], 1)


def conv() -> Case:
    torch.manual_seed(0)
    model = _peft(ConvNet(), r=2, target_modules=["c1", "c2", "c3"])
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 2, 2, 5, 5, generator=g))
    target = torch.randn(4, 6 * 8 + 5 * 36 + 4 * 50, generator=g)
    return Case(
        model,
        output=lambda m: m(*xs),
        loss=lambda m: (m(*xs) - target).square().mean(),
        expected={"base_model.model.c1.default": (2, 9, 6), "base_model.model.c2.default": (2, 27, 5),
                  "base_model.model.c3.default": (2, 18, 4)},
        merge=lambda m: m.merge_and_unload(),
        example_inputs=xs,
    )


def _vision_case(model, names_to_shapes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    return Case(
        model,
        output=lambda m: m(x),
        loss=lambda m: nn.functional.cross_entropy(m(x), y),
        expected=names_to_shapes,
        merge=lambda m: m.merge_and_unload(),
        example_inputs=x,
    )


def timm_vit() -> Case:
    import timm

    from reflora.adapters.timm import vit_target_modules

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=32, num_heads=2, num_classes=4)
    model = _peft(vit, r=4, target_modules=vit_target_modules(vit))
    exp = {}
    for i in range(2):
        pre = f"base_model.model.blocks.{i}"
        exp.update({f"{pre}.attn.qkv.default": (4, 32, 96), f"{pre}.attn.proj.default": (4, 32, 32),
                    f"{pre}.mlp.fc1.default": (4, 32, 128), f"{pre}.mlp.fc2.default": (4, 128, 32)})
    return _vision_case(model, exp)


def timm_swin() -> Case:
    import timm

    from reflora.adapters.timm import vit_target_modules

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=4)
    model = _peft(swin, r=2, target_modules=vit_target_modules(swin, parts=("attn",)))
    exp = {}
    for i, d in enumerate((16, 32)):
        pre = f"base_model.model.layers.{i}.blocks.0.attn"
        exp.update({f"{pre}.qkv.default": (2, d, 3 * d), f"{pre}.proj.default": (2, d, d)})
    return _vision_case(model, exp)


class GNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv, GATv2Conv, GCNConv, GINConv, SAGEConv, TransformerConv

        self.gcn = GCNConv(-1, 8)  # lazily initialised
        self.gat = GATConv(8, 4, heads=2)
        self.gatv2 = GATv2Conv(8, 8)
        self.sage = SAGEConv(8, 8)
        self.gin = GINConv(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
        self.tr = TransformerConv(8, 4, heads=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x, edge_index):
        for conv in (self.gcn, self.gat, self.gatv2, self.sage, self.gin, self.tr):
            x = torch.tanh(conv(x, edge_index))
        return self.head(x)


def pyg() -> Case:
    from torch_geometric.datasets import KarateClub

    from reflora.adapters.pyg import add_lora, merge_lora

    torch.manual_seed(0)
    data = KarateClub()[0]
    model = add_lora(GNN(), r=2, trainable=("head",))
    model(data.x, data.edge_index)  # materialise the lazy layers
    lin = [("gcn.lin", 34, 8), ("gat.lin", 8, 8), ("gatv2.lin_l", 8, 8), ("gatv2.lin_r", 8, 8),
           ("sage.lin_l", 8, 8), ("sage.lin_r", 8, 8), ("gin.nn.0", 8, 8), ("gin.nn.2", 8, 8),
           ("tr.lin_key", 8, 8), ("tr.lin_query", 8, 8), ("tr.lin_value", 8, 8), ("tr.lin_skip", 8, 8)]
    y = data.y
    return Case(
        model,
        output=lambda m: m(data.x, data.edge_index),
        loss=lambda m: nn.functional.cross_entropy(m(data.x, data.edge_index)[:, :3], y % 3),
        expected={n: (2, m_, n_) for n, m_, n_ in lin},
        merge=merge_lora,
        example_inputs=(data.x, data.edge_index),
    )


class RawLoRA(nn.Module):
    """loralib-style: the layer owns W0, lora_A and lora_B; plus a marked bottleneck."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W0 = nn.Parameter(torch.randn(12, 16, generator=g) / 4, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(3, 16, generator=g) / 4)
        self.lora_B = nn.Parameter(torch.zeros(12, 3))
        self.adapter = mark_pair(nn.Sequential(nn.Linear(12, 2, bias=False), nn.Linear(2, 12)))

    def forward(self, x):
        h = x @ (self.W0 + self.lora_B @ self.lora_A).T
        return h + self.adapter(h)


def raw() -> Case:
    torch.manual_seed(0)
    model = RawLoRA()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)
    return Case(
        model,
        output=lambda m: m(x),
        loss=lambda m: (m(x) - t).square().mean(),
        expected={"lora_A+lora_B": (3, 16, 12), "adapter": (2, 12, 12)},
        example_inputs=x,
    )


FAMILIES = {
    "llama": (llama, ("transformers", "peft")),
    "llama-dora": (llama_dora, ("transformers", "peft")),
    "llama-rslora": (llama_rslora, ("transformers", "peft")),
    "gpt2-conv1d": (gpt2, ("transformers", "peft")),
    "bert": (bert, ("transformers", "peft")),
    "deberta-v2": (deberta_v2, ("transformers", "peft")),
    "mixtral-moe": (mixtral, ("transformers", "peft")),
    "gpt-oss-moe": (gpt_oss, ("transformers", "peft")),
    "conv1d-2d-3d": (conv, ("peft",)),
    "timm-vit": (timm_vit, ("timm", "peft")),
    "timm-swin": (timm_swin, ("timm", "peft")),
    "pyg": (pyg, ("torch_geometric",)),
    "raw": (raw, ()),
}
