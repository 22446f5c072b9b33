"""reflora.handle: the handle's hooks and registry: a warmup longer than the run touches nothing,
remove() restores the bare optimizer, several handles on disjoint pairs, one pair attached twice."""

from __future__ import annotations

import pytest
import torch

from reflora import attach

from attach_helpers import LoRANet, LR, MODE_IDS, MODES, OPTIMIZERS, setup, train


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_warmup_longer_than_run_is_bit_identical(variant, space) -> None:
    net, opt, _ = setup("AdamW", variant, space, warmup_steps=100)
    bare = LoRANet()
    bare_opt = OPTIMIZERS["AdamW"](list(bare.parameters()), LR["AdamW"])
    train(net, opt, 15)
    train(bare, bare_opt, 15)
    for p, q in zip(net.parameters(), bare.parameters()):
        assert torch.equal(p, q)


def test_remove_restores_the_bare_optimizer() -> None:
    net, opt, handle = setup("Adam", "full", "gradient")
    bare = LoRANet()
    bare_opt = OPTIMIZERS["Adam"](list(bare.parameters()), LR["Adam"])
    handle.remove()
    train(net, opt, 5)
    train(bare, bare_opt, 5)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), bare.parameters()))
    attach(opt, net.pairs())  # can attach again after removal


def test_multiple_adapters_and_double_attach() -> None:
    net = LoRANet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    pairs = net.pairs()
    h1 = attach(opt, pairs[:1], variant="full")
    h2 = attach(opt, pairs[1:], variant="scalar", space="parameter")
    train(net, opt, 3)
    assert h1.step_count == h2.step_count == 3
    with pytest.raises(ValueError, match="already managed by RefLoRAHandle"):
        attach(opt, pairs[:1])
