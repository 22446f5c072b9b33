"""The layer-type scenarios of distributed_worker.py under FSDP2: conv LoRA (``conv``) and QLoRA on
an nf4 base (``qlora``), every mode against the library in one process on the whole batch."""

from __future__ import annotations

import peft
import torch
from torch import nn

import reflora
from reflora.adapters import find_pairs

from dist_common import GLOBAL_BATCH, RANK, full, init, make_optimizer, my_rows, rel



def _regression_steps(model, opt, handle, steps: int, seed: int, x_shape: tuple, y_shape: tuple, sharded: bool):
    """``steps`` steps of a squared-error fit to random targets (batch ``seed + t`` of the global
    batch; this rank's rows of it when ``sharded``); every pair's whole ``B A`` (factors flattened
    past their first dimension) after each step."""
    products = []
    for t in range(steps):
        g = torch.Generator().manual_seed(seed + t)
        x, y = torch.randn(GLOBAL_BATCH, *x_shape, generator=g), torch.randn(GLOBAL_BATCH, *y_shape, generator=g)
        if sharded:
            x, y = my_rows(x), my_rows(y)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        pairs = handle.pairs if handle else find_pairs(model)
        products.append([full(p.B.detach()).flatten(1) @ full(p.A.detach()).flatten(1) for p in pairs])
    return products


def build_conv(seed: int = 0) -> nn.Module:
    """A small CNN with PEFT LoRA on its two 3x3 convolutions (A: (r, 8, 3, 3), B: (8, r, 1, 1))."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(net, lcfg)


def conv_run(variant: str | None, space: str, opt_name: str, steps: int, sharded: bool) -> dict:
    """Train the CNN for ``steps`` steps of ``opt_name`` (RefLoRA in ``(variant, space)``, or none), under
    FSDP2 with :func:`reflora.distributed.lora_shard_placement` on this rank's slice of the global
    batch, or in one process on the whole batch; every pair's whole ``B A`` after each step."""
    from torch.distributed.fsdp import fully_shard

    model = build_conv()
    convs = [model.base_model.model[0], model.base_model.model[2]]
    placements = {}
    if sharded:
        place = reflora.distributed.lora_shard_placement(model)
        for conv in convs:
            fully_shard(conv, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        placements = {n: str(p.placements) for n, p in model.named_parameters() if "lora_" in n}
    opt = make_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad])
    handle = reflora.attach(opt, model, variant=variant, space=space, warmup_steps=0) if variant else None
    products = _regression_steps(model, opt, handle, steps, 2000, (8, 6, 6), (8, 6, 6), sharded)
    return {"products": products, "placements": placements, "pairs": len(products[0]),
            "layouts": [p.layout for p in find_pairs(model)]}


def _against_one_process(run, args) -> list[dict]:
    """Every mode of ``args["modes"]`` trained by ``run(variant, space, opt_name, steps, sharded)``
    sharded on every rank, and on rank 0 also in one process on the whole batch, with RefLoRA and
    without: ``traj_error`` (sharded against one process, over every step) and ``effect`` (RefLoRA
    against the bare optimizer, last step)."""
    init()
    out = []
    for variant, space, opt_name in args["modes"]:
        res = run(variant, space, opt_name, args["steps"], sharded=True)
        if RANK == 0:  # one process on the whole batch: the same training, RefLoRA and without
            one = run(variant, space, opt_name, args["steps"], sharded=False)
            bare = run(None, space, opt_name, args["steps"], sharded=False)
            last = len(one["products"]) - 1
            res["traj_error"] = max(rel(a, b) for k in range(last + 1) for a, b in zip(res["products"][k], one["products"][k]))
            res["effect"] = max(rel(a, b) for a, b in zip(one["products"][last], bare["products"][last]))
        res.pop("products")
        out.append(res)
    return out


def scenario_conv(args):
    """Conv LoRA under FSDP2 in every mode against the library in one process on the whole batch."""
    return _against_one_process(conv_run, args)


def build_qlora(seed: int = 0) -> nn.Module:
    """Two bitsandbytes nf4 ``Linear4bit`` layers (float32 quant storage, float32 compute) with PEFT
    LoRA (r = 4) on both: the QLoRA layer stack, small."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = [nn.Linear(16, 32), nn.Linear(32, 8)]
    layers_ = []
    for lin in dense:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4",
                              quant_storage=torch.float32)
        q.load_state_dict(lin.state_dict())
        layers_.append(q.to("cpu"))  # quantizes the weight
    net = nn.Sequential(layers_[0], nn.Tanh(), layers_[1])
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, lora_dropout=0.0)
    return peft.get_peft_model(net, lcfg)


def qlora_run(variant: str | None, space: str, opt_name: str, steps: int, sharded: bool) -> dict:
    """Train the 4-bit stack ``steps`` steps under FSDP2's default placement (``lora_A`` split along
    ``r``) on this rank's slice of the global batch, or in one process on the whole batch; every
    pair's whole ``B A`` after each step, and the 4-bit weights' bytes before and after."""
    from torch.distributed.fsdp import fully_shard

    model = build_qlora()
    blocks = [model.base_model.model[0], model.base_model.model[2]]
    base_before = [full(b.base_layer.weight.detach()).clone() for b in blocks]
    kinds = {}
    if sharded:
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        kinds = {n: f"{type(p).__name__} {getattr(p, 'placements', '')}" for n, p in model.named_parameters()}
    opt = make_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad])
    handle = reflora.attach(opt, model, variant=variant, space=space, warmup_steps=0) if variant else None
    products = _regression_steps(model, opt, handle, steps, 3000, (16,), (8,), sharded)
    base_after = [full(b.base_layer.weight.detach()) for b in blocks]
    return {"products": products, "kinds": kinds, "pairs": len(products[0]),
            "base_untouched": all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(base_before, base_after)),
            "quantized": all(type(b.base_layer.weight).__name__ in ("Params4bit", "DTensor") for b in blocks)}


def scenario_qlora(args):
    """QLoRA (nf4 base) under FSDP2's default placement in every mode against one process."""
    return _against_one_process(qlora_run, args)
