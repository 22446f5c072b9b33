"""The methods ``reflora bench`` compares: plain LoRA, its best-known neighbours (through PEFT and
pytorch-optimizer, as they ship), LoRA variants with and without RefLoRA on top, and every
RefLoRA mode. All train the same parameters from the same start, with the same batches, and none
clips gradients: ``lora-rite`` switches LoRA-RITE's own clipping (``clip_unmagnified_grad``) and
update skipping (``update_skipping``) off, since no other method gets a global clip. They are part
of LoRA-RITE's update rule as its authors ship it, though (pytorch-optimizer's defaults have them
on), so ``lora-rite-shipped`` runs it with every default, for a comparison fair to it."""

from __future__ import annotations

import torch
from torch import nn

import reflora

__all__ = ["BASE_OPTIMIZERS", "LORA_OPTIONS", "METHODS", "JointOptimizer", "MethodUnavailable", "base_optimizer",
           "lora_rite", "make_optimizer"]

# name -> description shown in tables
METHODS = {
    "lora": "plain LoRA (AdamW)",
    "lora+": "LoRA+ (PEFT create_loraplus_optimizer, ratio 16)",
    "riemannian": "Riemannian / ScaledGD (PEFT create_riemannian_optimizer)",
    "reflora": "RefLoRA: full, gradient space (the paper's reference form)",
    "reflora-param": "RefLoRA: full, parameter space + state transport",
    "reflora-s": "RefLoRA-S: scalar, parameter space (exact state transport)",
    "reflora-s-grad": "RefLoRA-S: scalar, gradient space",
    "lora-rite": "LoRA-RITE (pytorch-optimizer LoRARite on the pairs, AdamW on the rest; no clipping)",
    "lora-rite-shipped": "LoRA-RITE with pytorch-optimizer's defaults (its unmagnified-gradient clipping and update skipping on)",
    "rslora": "rsLoRA (PEFT use_rslora: scaling alpha/sqrt(r)), AdamW",
    "rslora+reflora": "rsLoRA + RefLoRA (attach's defaults)",
    "dora": "DoRA (PEFT use_dora), AdamW",
    "dora+reflora": "DoRA + RefLoRA (attach's defaults)",
}
# method -> the PEFT LoraConfig options its model is built with (Task.build(seed, **LORA_OPTIONS[m]))
LORA_OPTIONS = {
    "rslora": {"use_rslora": True},
    "rslora+reflora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora+reflora": {"use_dora": True},
}
MODES = {
    "reflora": ("full", "gradient"),
    "reflora-param": ("full", "parameter"),
    "reflora-s": ("scalar", "parameter"),
    "reflora-s-grad": ("scalar", "gradient"),
}


#: ``--optimizer`` name -> (description, learning-rate scale against the task's AdamW rates). The
#: scale moves the task's rate grid to where each optimizer's rates usually lie (Muon's and
#: schedule-free SGD's are larger, Lion's smaller); Prodigy estimates its own step size, so its
#: grid is the task's divided by the shared rate (lr 1 at the shared rate, Prodigy's default).
BASE_OPTIMIZERS = {
    "adamw": ("torch.optim.AdamW", 1.0),
    "muon": ("torch.optim.Muon on the LoRA factors, AdamW on the rest", 10.0),
    "adamw-schedulefree": ("schedulefree.AdamWScheduleFree", 1.0),
    "sgd-schedulefree": ("schedulefree.SGDScheduleFree", 100.0),
    "lion": ("pytorch_optimizer.Lion", 0.3),
    "adopt": ("pytorch_optimizer.ADOPT", 1.0),
    "ademamix": ("pytorch_optimizer.AdEMAMix", 1.0),
    "prodigy": ("pytorch_optimizer.Prodigy", None),
    "soap": ("pytorch_optimizer.SOAP", 1.0),
}
#: the methods that run under every ``--optimizer`` (the others are built on AdamW)
ANY_OPTIMIZER = ("lora", "reflora", "reflora-param", "reflora-s", "reflora-s-grad")


class MethodUnavailable(RuntimeError):
    """The method cannot run on this task (reported as n/a, with the reason)."""


class JointOptimizer:
    """Several optimizers stepped as one (LoRA-RITE on the pairs, AdamW on heads and biases)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    @property
    def param_groups(self) -> list:
        return [g for o in self.optimizers for g in o.param_groups]


def lora_rite(model: nn.Module, lr: float, **kw) -> JointOptimizer:
    """pytorch-optimizer's ``LoRARite`` on ``model``'s pairs, ``torch.optim.AdamW`` on the rest.

    The pairs and their order come from reflora's discovery (:func:`reflora.adapters.find_pairs`),
    passed as ``A_1, B_1, A_2, B_2, ...`` (``LoRARite`` pairs up consecutive parameters; ``A`` is
    ``r x in``, rank dimension 0, ``B`` is ``out x r``, rank dimension -1). ``kw`` override the
    bench's settings: no clipping, no update skipping, weight decay 0.
    """
    from pytorch_optimizer import LoRARite

    from reflora.adapters import find_pairs

    pairs = find_pairs(model)
    odd = [p.name for p in pairs if p.layout != ("plain", "plain") or p.experts != 1]
    if odd:
        raise MethodUnavailable(f"LoRARite takes plain 2-D factors (A: r x in, B: out x r); {len(odd)} pair(s) are not, "
                                f"e.g. {odd[0]!r}")
    factors = [t for p in pairs for t in (p.A, p.B)]
    ids = {id(t) for t in factors}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opts = dict(clip_unmagnified_grad=0.0, update_skipping=0.0, weight_decay=0.0)
    opts.update(kw)
    rite = LoRARite(factors, lr=lr, **opts)
    return JointOptimizer(rite, torch.optim.AdamW(rest, lr=lr, weight_decay=0.0) if rest else None)


def base_optimizer(name: str, model: nn.Module, lr: float, shared_lr: float | None = None):
    """``(optimizer, the optimizer holding the LoRA factors)`` for ``--optimizer name`` on ``model``'s
    trainable parameters at the task's rate ``lr`` (scaled by :data:`BASE_OPTIMIZERS`)."""
    if name not in BASE_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(BASE_OPTIMIZERS)}; got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    scale = BASE_OPTIMIZERS[name][1]
    lr_ = lr * scale if scale is not None else lr / (shared_lr or lr)
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr_, weight_decay=0.0)
        return opt, opt
    if name == "muon":
        from reflora.adapters import find_pairs

        ids = {id(t) for p in find_pairs(model) for t in (p.A, p.B)}
        factors = [p for p in params if id(p) in ids]
        rest = [p for p in params if id(p) not in ids]
        if any(p.dim() != 2 for p in factors):
            raise MethodUnavailable("torch.optim.Muon takes 2-D parameters only; this task's LoRA factors are not all 2-D")
        muon = torch.optim.Muon(factors, lr=lr_, weight_decay=0.0)
        return JointOptimizer(muon, torch.optim.AdamW(rest, lr=lr, weight_decay=0.0) if rest else None), muon
    try:
        if name in ("adamw-schedulefree", "sgd-schedulefree"):
            import schedulefree

            cls = schedulefree.AdamWScheduleFree if name == "adamw-schedulefree" else schedulefree.SGDScheduleFree
            opt = cls(params, lr=lr_, weight_decay=0.0)
            opt.train()  # schedule-free optimizers start in eval mode
            return opt, opt
        import pytorch_optimizer as po
    except ImportError as exc:
        raise MethodUnavailable(f"--optimizer {name} needs its package: pip install 'reflora[bench]'") from exc
    cls = {"lion": po.Lion, "adopt": po.ADOPT, "ademamix": po.AdEMAMix, "prodigy": po.Prodigy, "soap": po.SOAP}[name]
    opt = cls(params, lr=lr_, weight_decay=0.0)
    return opt, opt


def make_optimizer(method: str, model: nn.Module, lr: float, optimizer: str = "adamw", shared_lr: float | None = None,
                   **attach_kw):
    """``(optimizer, handle or None)`` for ``method`` on ``model``'s trainable parameters.

    ``optimizer``: the base optimizer (:data:`BASE_OPTIMIZERS`; not ``"adamw"``: the methods of
    :data:`ANY_OPTIMIZER` only, RefLoRA attached to the optimizer that holds the factors).
    ``attach_kw`` go to :func:`reflora.attach` (``interval=``, ``warmup_steps=``, ...): RefLoRA
    methods only."""
    if attach_kw and method not in MODES and not method.endswith("+reflora"):
        raise ValueError(f"attach options {sorted(attach_kw)} apply to the RefLoRA methods only; got method {method!r}")
    if optimizer != "adamw":
        if method not in ANY_OPTIMIZER:
            raise MethodUnavailable(f"{method} is built on AdamW; under --optimizer {optimizer} the bench runs "
                                    f"{', '.join(ANY_OPTIMIZER)}")
        opt, holder = base_optimizer(optimizer, model, lr, shared_lr)
        if method == "lora":
            return opt, None
        variant, space = MODES[method]
        return opt, reflora.attach(holder, model, variant=variant, space=space, **attach_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if method in ("lora", "rslora", "dora"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None
    if method in ("lora-rite", "lora-rite-shipped"):
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError as exc:
            raise MethodUnavailable("LoRA-RITE needs pytorch-optimizer>=4.1: pip install 'reflora[bench]'") from exc
        if method == "lora-rite-shipped":  # LoRARite's own defaults for clipping and skipping
            return lora_rite(model, lr, clip_unmagnified_grad=1.0, update_skipping=1.0), None
        return lora_rite(model, lr), None
    if method in ("rslora+reflora", "dora+reflora"):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return opt, reflora.attach(opt, model, **attach_kw)
    if method == "lora+":
        from peft.optimizers import create_loraplus_optimizer

        try:
            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0, weight_decay=0.0), None
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed silently
            raise MethodUnavailable(f"PEFT LoRA+ failed on this model: {exc}") from exc
    if method == "riemannian":
        from peft.optimizers import create_riemannian_optimizer

        try:
            return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0), None
        except Exception as exc:  # noqa: BLE001
            raise MethodUnavailable(f"PEFT's Riemannian optimizer does not apply: {exc}") from exc
    if method in MODES:
        variant, space = MODES[method]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return opt, reflora.attach(opt, model, variant=variant, space=space, **attach_kw)
    raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
