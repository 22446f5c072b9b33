"""Pairs named by their keys in a parameter dict, for :mod:`reflora.func` (``torch.func`` training).

:func:`reflora.func.pairs_of` names the pairs discovery finds in a module by their keys in
``dict(model.named_parameters())``, the keys ``torch.func.functional_call`` and
``torch.func.stack_module_state`` use; :func:`as_param_pairs` normalises what a user passes.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, NamedTuple

from torch import Tensor, nn

from reflora.adapters import NoPairsFoundError, find_pairs
from reflora.config import check_int
from reflora.pairs import LAYOUTS, validate

__all__ = ["ParamPair", "as_param_pairs", "pairs_of"]


class ParamPair(NamedTuple):
    """A LoRA pair named by its parameters' keys in the params dict.

    Attributes:
        A: key of the down-projection (``lora_A.weight``, ``(r, m)`` in the core's layout).
        B: key of the up-projection (``lora_B.weight``, ``(n, r)``).
        layout: the stored layouts of ``A`` and ``B`` (:data:`reflora.pairs.LAYOUTS`).
        experts: how many MoE expert pairs the two tensors stack (see :class:`reflora.LoRAPair`).
        name: the pair's name (discovery's name; ``None``: the key of ``A``). It keys the
            cached metrics in the state.
    """

    A: str
    B: str
    layout: tuple[str, str] = ("plain", "plain")
    experts: int = 1
    name: str | None = None

    @property
    def key(self) -> str:
        return self.A if self.name is None else self.name


def pairs_of(
    model: nn.Module, *, adapters: Literal["active", "all"] = "active", example_inputs: Any = None,
) -> tuple[ParamPair, ...]:
    """The LoRA pairs of ``model``, named by their keys in ``dict(model.named_parameters())``.

    Discovery is :func:`reflora.adapters.find_pairs` (PEFT, timm, PyG, loralib-style and marked
    pairs; layouts and MoE experts included); a pair's factors are matched to their names by
    identity. The keys are those of ``model.named_parameters()``, which is what
    ``torch.func.functional_call`` and ``torch.func.stack_module_state`` use.

    Args:
        model: the module whose pairs are wanted.
        adapters: ``"active"`` or ``"all"`` adapters of multi-adapter (PEFT) models.
        example_inputs: what ``model`` is called with; when given, pairs no finder recognises
            are found by traced discovery (``find_pairs(model, example_inputs=...)``).

    Raises:
        reflora.adapters.NoPairsFoundError: the model holds no trainable pair.
        ValueError: a pair's factor is not among the model's parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        found = find_pairs(model, adapters=adapters, example_inputs=example_inputs)
    except NoPairsFoundError:
        raise NoPairsFoundError(
            f"no trainable low-rank pair found in {type(model).__name__}: name the pairs yourself, "
            "ParamPair(name_of_A, name_of_B) or (name_of_A, name_of_B) tuples"
            + (", or pass example_inputs= to find them from a forward pass" if example_inputs is None else "")
            + ", or register a finder for your LoRA layer (reflora.adapters.register_finder)"
        ) from None
    out = []
    for pair in found:
        keys = []
        for label, t in (("A", pair.A), ("B", pair.B)):
            key = names.get(id(t))
            if key is None:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not among "
                    f"{type(model).__name__}.named_parameters(); pass the module that owns it"
                )
            keys.append(key)
        out.append(ParamPair(keys[0], keys[1], tuple(pair.layout), pair.experts, pair.name))
    return tuple(out)


def as_param_pairs(pairs: Any) -> tuple[ParamPair, ...]:
    """``pairs`` of :mod:`reflora.func` as :class:`ParamPair` s: found in an ``nn.Module``
    (:func:`reflora.func.pairs_of`), or normalised from ``ParamPair`` s and ``(name_of_A, name_of_B)`` tuples
    and checked (:func:`reflora.pairs.validate`); ``None``: no pairs."""
    if pairs is None:
        return ()
    if isinstance(pairs, nn.Module):
        return pairs_of(pairs)
    if isinstance(pairs, (str, bytes, Tensor)) or not isinstance(pairs, Iterable):
        raise TypeError(
            "pairs must be an nn.Module (pairs found by reflora.func.pairs_of), an iterable of "
            f"ParamPair / (name_of_A, name_of_B) tuples, or None (no RefLoRA); got {type(pairs).__name__}"
        )
    out: list[ParamPair] = []
    for i, item in enumerate(pairs):
        if not isinstance(item, ParamPair):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"pairs[{i}] must be a ParamPair or a (name_of_A, name_of_B) tuple; got {item!r}"
                )
            item = ParamPair(item[0], item[1])
        for label, key in (("A", item.A), ("B", item.B)):
            if not isinstance(key, str):
                raise TypeError(f"pairs[{i}]: the name of {label} must be a str (a key of params); got {key!r}")
        if item.name is not None and not isinstance(item.name, str):
            raise TypeError(f"pairs[{i}]: name must be a str or None; got {item.name!r}")
        if not (isinstance(item.layout, tuple) and len(item.layout) == 2 and all(x in LAYOUTS for x in item.layout)):
            raise ValueError(f"pairs[{i}]: layout must be a pair of {LAYOUTS}; got {item.layout!r}")
        check_int(f"pairs[{i}].experts", item.experts, 1)
        out.append(item)
    if not out:
        raise ValueError(
            "no pairs given: RefLoRA would be a silent no-op; pass at least one pair, or pairs=None "
            "for the plain optimizer"
        )
    return tuple(validate(out))
