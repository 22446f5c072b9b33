"""Adapter discovery: find the trainable low-rank pairs of a model (installed as ``reflora.adapters``).

Discovery is an ordered list of *finders*. A finder is a callable
``finder(name, module, options) -> list[LoRAPair] | None`` asked about every submodule of the
model in ``named_modules()`` order: it returns the pairs that module owns (possibly none, to
skip it), or ``None`` when it does not recognise the module. Finders are asked in priority
order (highest first) and the first answer for a module wins; submodules are asked too (a
loralib-style layer may contain another adapter), and a pair reached twice is kept once.
Pairing is by structure (the module that owns both factors),
never by parameter order or name substrings. Optional dependencies (peft, torch_geometric) are
imported inside the finders, and only when the model can hold their layers.

Built-in finders, in the order they are asked:

========================  ==========================================================
``peft_lora``             PEFT ``LoraLayer``: Linear (incl. GPT-2 ``Conv1D``), Embedding,
                          Conv1d/2d/3d, DoRA and rsLoRA, MoE experts (``ParamWrapper``,
                          one pair per expert); other PEFT tuners are skipped
                          with a warning (VeRA, AdaLoRA, LoHa, LoKr, IA3, ...)
``reflora_pyg``           :class:`reflora.adapters.pyg.LoRALinear`, the LoRA this package
                          injects into torch-geometric models (:func:`~reflora.adapters.pyg.add_lora`)
``marked_bottleneck``     ``Sequential(Linear(m, r, bias=False), Linear(r, n))`` marked with
                          :func:`mark_pair`
``owned_factors``         loralib-style modules owning 2-D ``lora_A`` / ``lora_B`` parameters
========================  ==========================================================

Packages can add finders through the entry-point group ``reflora.finders``
(:mod:`reflora.adapters.plugins`), loaded at the first call, once, and ordered by priority.

After the finders, and only when ``example_inputs`` are given, *traced discovery*
(:mod:`reflora.adapters.traced`) finds the pairs no finder recognised from one forward pass,
and keeps a pair only if a random refactor ``(P^T A, B P^{-T})`` leaves the outputs unchanged:
a LoRA written any way (torchtune, DeepSpeed-Chat, diffusers, raw parameters) needs no finder.
``find_pairs(..., explain=True)`` returns a :class:`DiscoveryReport` saying what was considered,
found and rejected, and why. See ``docs/finding-pairs.md``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from reflora.adapters import find_pairs
    >>> class LoRALinear(nn.Module):  # loralib-style: the module owns lora_A and lora_B
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lora_A = nn.Parameter(torch.randn(4, 16))
    ...         self.lora_B = nn.Parameter(torch.zeros(8, 4))
    >>> [p.name for p in find_pairs(nn.Sequential(LoRALinear(), LoRALinear()))]
    ['0', '1']
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional, overload

from torch import Tensor, nn

from reflora.adapters.traced import Candidate, DiscoveryReport, factor_name, trace_pairs
from reflora.functional import check_ranks
from reflora.pairs import LoRAPair, UnusedPairWarning, canonical_name, validate

__all__ = [
    "Candidate",
    "DiscoveryReport",
    "FindOptions",
    "Finder",
    "LoRAPair",
    "NoPairsFoundError",
    "as_pairs",
    "find_pairs",
    "list_finders",
    "mark_pair",
    "register_finder",
    "trace_pairs",
    "unregister_finder",
]


@dataclass(frozen=True)
class FindOptions:
    """Options every finder receives.

    Attributes:
        adapters: ``"active"`` (default) takes the adapters a multi-adapter model is using;
            ``"all"`` takes every adapter that has trainable factors.
    """

    adapters: Literal["active", "all"] = "active"


Finder = Callable[[str, nn.Module, FindOptions], Optional[list[LoRAPair]]]


class NoPairsFoundError(ValueError):
    """Raised when discovery finds no trainable low-rank pair in a model."""


@dataclass(frozen=True)
class _Entry:
    name: str
    finder: Finder
    priority: int
    supports: str


_REGISTRY: list[_Entry] = []


def register_finder(name: str, finder: Finder, *, priority: int = 0, supports: str = "") -> Finder:
    """Register ``finder`` under ``name``; higher ``priority`` is asked first.

    Args:
        name: unique name of the finder.
        finder: ``finder(name, module, options) -> list[LoRAPair] | None``.
        priority: built-ins use 100 (PEFT), 50 (PyG), 10 (marked bottleneck), -100 (generic).
        supports: a short description of what it finds, shown when nothing is found.

    Raises:
        TypeError: ``name`` is not a string, ``finder`` not callable or ``priority`` not an int.
        ValueError: a finder called ``name`` is already registered (unregister it first).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"finder name must be a non-empty str; got {name!r}")
    if not callable(finder):
        raise TypeError(f"finder {name!r} must be callable; got {type(finder).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int; got {type(priority).__name__}")
    if any(e.name == name for e in _REGISTRY):
        raise ValueError(
            f"a finder named {name!r} is already registered; call "
            f"reflora.adapters.unregister_finder({name!r}) first to replace it"
        )
    _REGISTRY.append(_Entry(name, finder, priority, supports or name))
    _REGISTRY.sort(key=lambda e: -e.priority)  # stable: equal priorities keep registration order
    return finder


def unregister_finder(name: str) -> None:
    """Remove the finder registered as ``name`` (KeyError if there is none)."""
    for i, e in enumerate(_REGISTRY):
        if e.name == name:
            del _REGISTRY[i]
            return
    raise KeyError(f"no finder named {name!r}; registered: {[e.name for e in _REGISTRY]}")


def list_finders() -> list[tuple[str, int]]:
    """``(name, priority)`` of every registered finder (plugins included), in the order they are asked."""
    _load_plugins()
    return [(e.name, e.priority) for e in _REGISTRY]


def _load_plugins() -> None:
    from reflora.adapters.plugins import load_plugins

    load_plugins(register_finder, lambda: {e.name for e in _REGISTRY})


@overload
def find_pairs(
    model: nn.Module, *, adapters: Literal["active", "all"] = ..., trainable_only: bool = ...,
    example_inputs: Any = ..., explain: Literal[False] = ...,
) -> list[LoRAPair]: ...


@overload
def find_pairs(
    model: nn.Module, *, adapters: Literal["active", "all"] = ..., trainable_only: bool = ...,
    example_inputs: Any = ..., explain: Literal[True],
) -> DiscoveryReport: ...


def find_pairs(
    model: nn.Module,
    *,
    adapters: Literal["active", "all"] = "active",
    trainable_only: bool = True,
    example_inputs: Any = None,
    explain: bool = False,
) -> list[LoRAPair] | DiscoveryReport:
    """Every low-rank pair in ``model``: the finders' first, in module order, then traced ones.

    Pair names are canonical (:func:`reflora.pairs.canonical_name`): the segments torch's
    wrappers insert (DDP / ``DataParallel`` ``module.``, ``torch.compile`` ``_orig_mod.``, FSDP,
    activation checkpointing) are dropped, so ``find_pairs(DDP(model))`` and
    ``find_pairs(model)`` name the pairs identically.

    Args:
        model: any ``nn.Module``.
        adapters: ``"active"`` or ``"all"`` adapters of multi-adapter (PEFT) models.
        trainable_only: keep only pairs whose factors both require grad. A pair with exactly one
            frozen factor (LoRA-FA freezes A) is skipped with a warning: refactoring would change
            the frozen factor. Traced discovery only ever finds trainable pairs.
        example_inputs: what ``model`` is called with (a tensor, a tuple of positional
            arguments or a dict of keyword arguments). When given, the trainable parameters
            the finders did not pair are traced through one forward pass and every proposed
            pair is verified (:func:`reflora.adapters.traced.trace_pairs`); this costs a few
            forward passes, once. ``None`` (default): finders only.
        explain: return a :class:`DiscoveryReport` (pairs found, parameters considered,
            proposals rejected and why) instead of the list, and do not raise when nothing
            is found.

    Returns:
        ``list[LoRAPair]``, or a :class:`DiscoveryReport` with ``explain=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``explain`` is not a bool, or
            ``example_inputs`` has an unsupported type.
        NoPairsFoundError: nothing was found (never a silent no-op).
        ValueError: two pairs share a parameter, or a pair's ranks disagree.
        RuntimeError: the forward pass on ``example_inputs`` failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if adapters not in ("active", "all"):
        raise ValueError(f"adapters must be 'active' or 'all'; got {adapters!r}")
    if not isinstance(explain, bool):
        raise TypeError(f"explain must be a bool; got {type(explain).__name__}")
    _load_plugins()
    options = FindOptions(adapters=adapters)
    pairs: list[LoRAPair] = []
    seen: set[tuple[int, int]] = set()
    raw_names: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        # finders see canonical names (wrapper segments such as DDP's `module.` or
        # torch.compile's `_orig_mod.` dropped), so a wrapped and a bare model name their pairs
        # identically and handle checkpoints move between them
        clean = canonical_name(name)
        for entry in _REGISTRY:
            found = entry.finder(clean, module, options)
            if found is not None:
                for p in found:
                    key = (id(p.A), id(p.B))
                    if key not in seen:  # the same pair reached again through a nested module
                        seen.add(key)
                        pairs.append(p)
                        raw_names[id(p)] = (name, clean)
                break
    if len({p.name for p in pairs}) < len(pairs):
        # two modules differ only in wrapper-like segments (a model's own child called
        # `module`): canonical names would be ambiguous, so this model keeps its raw names
        pairs = [_raw_named(p, *raw_names[id(p)]) for p in pairs]
    if any(not p.name for p in pairs):  # the root module's own pair: named after its factors
        qualified = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
        pairs = [p if p.name else dataclasses.replace(p, name=factor_name(qualified[id(p.A)], qualified[id(p.B)]))
                 for p in pairs]
    claimed = [t for p in pairs for t in (p.A, p.B)]  # frozen ones too: tracing must not re-find them
    if trainable_only:
        kept = []
        for p in pairs:
            if p.A.requires_grad and p.B.requires_grad:
                kept.append(p)
            elif p.A.requires_grad or p.B.requires_grad:
                frozen = "A" if not p.A.requires_grad else "B"
                warnings.warn(
                    f"skipping pair {p.name!r}: its {frozen} factor is frozen (LoRA-FA style); "
                    "refactoring would change the frozen factor",
                    stacklevel=2,
                )
        pairs = kept
    if example_inputs is not None:
        report = trace_pairs(model, example_inputs, exclude=claimed, structural=pairs)
    else:
        report = DiscoveryReport(pairs, pairs, [], [], [], {}, traced_run=False)
    pairs = validate(report.pairs)
    if explain:
        return report
    if example_inputs is not None:
        _check_reached(model, report)
    if not pairs:
        raise NoPairsFoundError(
            f"no trainable low-rank pair found in {type(model).__name__}"
            + (
                ": pass example_inputs= to find the pairs from a forward pass, "
                if example_inputs is None
                else ", and traced discovery on example_inputs found none either (explain=True says why): "
            )
            + "register a finder for your LoRA layer with reflora.adapters.register_finder, or pass explicit "
            f"(A, B) pairs to reflora.attach (finders asked: {', '.join(e.name for e in _REGISTRY)})"
        )
    return pairs


def _check_reached(model: nn.Module, report: DiscoveryReport) -> None:
    """With example inputs: an error if the forward pass used none of the pairs found, one warning
    naming the pairs it did not reach and the trainable parameters it never read."""
    if report.pairs and len(report.unreached) == len(report.pairs):
        raise NoPairsFoundError(
            f"example_inputs reach none of the {len(report.pairs)} pair(s) found in {type(model).__name__} "
            f"({_listed(report.unreached)}): the forward pass never used their factors. Pass inputs that run "
            "the adapters, or check that the LoRA layers are called (a wrapper its parent module bypasses, "
            "such as a LoRA on nn.MultiheadAttention's out_proj, never runs)"
        )
    parts = []
    if report.unreached:
        parts.append(f"pair(s) {_listed(report.unreached)} (RefLoRA manages them, but they get no gradient)")
    if report.unused:
        parts.append(f"trainable parameter(s) {_listed(report.unused)} (no pair could be found for them)")
    if parts:
        warnings.warn(
            f"the forward pass on example_inputs never used {' and '.join(parts)}. Pass inputs that reach every "
            "adapter, or leave unused ones out (find_pairs(..., explain=True) says more)",
            UnusedPairWarning,
            stacklevel=3,
        )


def _listed(names: list[str], most: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _raw_named(pair: LoRAPair, raw: str, clean: str) -> LoRAPair:
    if raw == clean or not pair.name.startswith(clean):
        return pair
    suffix = pair.name[len(clean):]
    if not clean and suffix:  # the root's pairs are named without a leading dot
        suffix = "." + suffix
    return dataclasses.replace(pair, name=raw + suffix)


def mark_pair(module: nn.Sequential) -> nn.Sequential:
    """Mark a bottleneck ``Sequential(Linear(m, r, bias=False), Linear(r, n))`` as a LoRA pair.

    ``A`` is the first layer's weight ``(r, m)``, ``B`` the second's ``(n, r)``; the second layer
    may have a bias (it does not enter ``B A``), the first may not (a bias between the factors
    would change under refactoring). Returns the module, marked, for chaining.
    """
    if not (
        isinstance(module, nn.Sequential)
        and len(module) == 2
        and all(isinstance(m, nn.Linear) for m in module)
    ):
        raise TypeError("mark_pair expects nn.Sequential(nn.Linear(m, r, bias=False), nn.Linear(r, n))")
    if module[0].bias is not None:
        raise ValueError(
            "the down-projection of a marked pair must have bias=False: a bias between A and B "
            "would not be preserved by refactoring"
        )
    check_ranks(module[0].weight.shape, module[1].weight.shape)
    module._reflora_pair = True  # type: ignore[attr-defined]
    return module


def _marked_bottleneck(name: str, module: nn.Module, options: FindOptions) -> list[LoRAPair] | None:
    if getattr(module, "_reflora_pair", False):
        return [LoRAPair(name, module[0].weight, module[1].weight, module=module)]
    return None


def _owned_factors(name: str, module: nn.Module, options: FindOptions) -> list[LoRAPair] | None:
    """loralib-style modules that own ``lora_A`` / ``lora_B`` as 2-D parameters directly."""
    A = module._parameters.get("lora_A")
    B = module._parameters.get("lora_B")
    if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) and A.dim() == 2 and B.dim() == 2:
        return [LoRAPair(name, A, B, module=module)]
    return None


def _register_builtins() -> None:
    from reflora.adapters.peft import find_peft_lora
    from reflora.adapters.pyg import find_reflora_pyg

    register_finder(
        "peft_lora", find_peft_lora, priority=100,
        supports=(
            "PEFT LoRA Linear / Conv1D / Embedding / Conv1d-3d / MoE experts (ParamWrapper, one pair "
            "per expert), incl. DoRA and rsLoRA"
        ),
    )
    register_finder(
        "reflora_pyg", find_reflora_pyg, priority=50,
        supports="torch-geometric layers given LoRA by reflora.adapters.pyg.add_lora",
    )
    register_finder(
        "marked_bottleneck", _marked_bottleneck, priority=10,
        supports="nn.Sequential(Linear(m, r, bias=False), Linear(r, n)) marked by reflora.adapters.mark_pair",
    )
    register_finder(
        "owned_factors", _owned_factors, priority=-100,
        supports="modules owning 2-D lora_A (r, m) and lora_B (n, r) parameters (loralib style)",
    )


_register_builtins()


def as_pairs(pairs: Any, example_inputs: Any = None) -> list[LoRAPair]:
    """``pairs`` as a list of :class:`LoRAPair`: found in an ``nn.Module`` (by
    :func:`reflora.adapters.find_pairs`), or normalised from ``(A, B)`` tuples / ``LoRAPair`` s
    (tuples are named ``pair0``, ``pair1``, ...)."""
    if isinstance(pairs, nn.Module):
        return find_pairs(pairs, example_inputs=example_inputs)
    if example_inputs is not None:
        raise TypeError(
            "example_inputs= is for finding pairs in a model: pass the nn.Module as pairs, or leave "
            f"example_inputs out when passing explicit pairs (got pairs of type {type(pairs).__name__})"
        )
    if isinstance(pairs, (Tensor, str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(
            "pairs must be an nn.Module (pairs found by reflora.adapters.find_pairs) or an iterable "
            f"of (A, B) parameter tuples / LoRAPair; got {type(pairs).__name__}"
        )
    out: list[LoRAPair] = []
    for i, item in enumerate(pairs):
        if isinstance(item, LoRAPair):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoRAPair(f"pair{i}", item[0], item[1]))
        else:
            raise TypeError(
                f"pairs[{i}] must be an (A, B) tuple of parameters or a LoRAPair; got {type(item).__name__}"
            )
    if not out:
        raise ValueError("no pairs given: RefLoRA would be a silent no-op; pass at least one (A, B) pair")
    return out
