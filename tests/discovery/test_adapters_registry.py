"""The finder registry skeleton of reflora.adapters (discovery proper is a later issue)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reflora.adapters as adapters
from reflora.adapters import find_pairs, LoRAPair, NoPairsFoundError, register_finder, unregister_finder


class OwnedLoRA(nn.Module):
    def __init__(self, m: int, n: int, r: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, m))
        self.lora_B = nn.Parameter(torch.zeros(n, r))


class Bottleneck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(16, 4, bias=False)
        self.up = nn.Linear(4, 8, bias=False)
        self.inner = OwnedLoRA(3, 3, 1)  # nested inside a found module: found too


def test_generic_finder_finds_owned_factors() -> None:
    model = nn.Sequential(OwnedLoRA(16, 8, 4), nn.ReLU(), OwnedLoRA(8, 2, 2))
    pairs = find_pairs(model)
    assert [p.name for p in pairs] == ["0", "2"]
    assert [p.shape for p in pairs] == [(4, 16, 8), (2, 8, 2)]
    assert pairs[0].A is model[0].lora_A and pairs[0].b() is model[0].lora_B


def test_priority_order_first_match_wins_and_nested_pairs_are_found() -> None:
    calls = []

    def bottleneck(name, module, options):
        calls.append(name)
        if isinstance(module, Bottleneck):
            return [LoRAPair(name, module.down.weight, module.up.weight, module=module)]
        return None

    register_finder("test_bottleneck", bottleneck, priority=500)
    try:
        assert adapters.list_finders()[0] == ("test_bottleneck", 500)
        model = nn.Sequential(Bottleneck(), OwnedLoRA(4, 4, 2))
        pairs = find_pairs(model)
        assert [p.name for p in pairs] == ["0", "0.inner", "1"]
        assert pairs[0].shape == (4, 16, 8)
        assert "0.inner" in calls
        with pytest.raises(ValueError, match="already registered"):
            register_finder("test_bottleneck", bottleneck)
    finally:
        unregister_finder("test_bottleneck")
    assert "test_bottleneck" not in dict(adapters.list_finders())


def test_no_pairs_is_an_error() -> None:
    with pytest.raises(NoPairsFoundError, match=r"no trainable low-rank pair found in Linear.*register_finder"):
        find_pairs(nn.Linear(3, 3))
    frozen = OwnedLoRA(4, 4, 2).requires_grad_(False)
    with pytest.raises(NoPairsFoundError):
        find_pairs(frozen)
    assert len(find_pairs(frozen, trainable_only=False)) == 1


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: find_pairs("model"), TypeError, "model must be a torch.nn.Module; got str"),
        (lambda: register_finder("", lambda n, m, o: None), TypeError, "non-empty str"),
        (lambda: register_finder("x", 3), TypeError, "finder 'x' must be callable"),
        (lambda: register_finder("x", lambda n, m, o: None, priority=1.5), TypeError, "priority must be an int"),
        (lambda: unregister_finder("nope"), KeyError, "no finder named 'nope'"),
        (
            lambda: LoRAPair("p", nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(3, 4))),
            ValueError,
            r"A has rank 8 \(shape \(8, 5\)\) but B has rank 4 \(shape \(3, 4\)\)",
        ),
        (lambda: LoRAPair("p", nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(3, 8))), ValueError, "A must be 2-D"),
    ],
)
def test_registry_bad_input(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_shared_parameter_rejected() -> None:
    shared = nn.Parameter(torch.randn(2, 6))

    def dup(name, module, options):
        if isinstance(module, nn.Linear):
            return [LoRAPair(name, shared, module.weight)]
        return None

    register_finder("test_dup", dup, priority=60)
    try:
        with pytest.raises(ValueError, match="each factor may belong to one pair only"):
            find_pairs(nn.Sequential(nn.Linear(2, 4, bias=False), nn.Linear(2, 4, bias=False)))
    finally:
        unregister_finder("test_dup")
