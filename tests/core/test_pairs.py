"""reflora.pairs: LoRAPair's layouts (views that share storage, MoE expert stacks and their
checks) and canonical pair names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reflora import LoRAPair
from reflora.pairs import canonical_name, to_core


def test_canonical_names() -> None:
    assert canonical_name("module._orig_mod.layers.0._fsdp_wrapped_module.q.default") == "layers.0.q.default"
    assert canonical_name("_orig_mod.module.x._checkpoint_wrapped_module.y") == "x.y"
    assert canonical_name("encoder.module.x") == "encoder.module.x"  # a model's own child called module
    assert canonical_name("module") == ""


def test_transposed_views_share_storage() -> None:
    emb_A = nn.Parameter(torch.randn(10, 4))  # embedding-style: A stored (m, r)
    B = nn.Parameter(torch.randn(6, 4))
    pair = LoRAPair("emb", emb_A, B, layout=("transposed", "plain"))
    assert pair.a().shape == (4, 10) and pair.a().data_ptr() == emb_A.data_ptr()
    assert torch.equal(pair.delta(), B.detach() @ emb_A.detach().T)


def test_lora_pair_expert_validation() -> None:
    A, B = nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(3, 8))
    lay = ("expert_rows", "expert_cols")
    assert LoRAPair("ok", A, B, lay, experts=4).shape == (2, 5, 3)
    assert LoRAPair("one", A, B, lay).a().shape == (8, 5)  # one expert: the plain view
    with pytest.raises(TypeError, match="experts must be an int"):
        LoRAPair("x", A, B, lay, experts=True)
    with pytest.raises(ValueError, match="experts must be >= 1"):
        LoRAPair("x", A, B, lay, experts=0)
    with pytest.raises(ValueError, match="cannot hold 3 experts .* not a multiple of 3"):
        LoRAPair("x", A, B, lay, experts=3)
    with pytest.raises(ValueError, match="experts=4 needs an expert layout for A"):
        LoRAPair("x", A, B, ("plain", "expert_cols"), experts=4)
    with pytest.raises(ValueError, match=r"A has rank 4 \(shape \(2, 4, 5\)\) but B has rank 3"):
        LoRAPair("x", A, nn.Parameter(torch.randn(3, 6)), lay, experts=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        to_core(A, "stacked")
