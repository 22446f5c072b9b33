"""The errors a user meets at each entry point: each names the problem and the fix in its first
sentence, and stays short enough to read in a terminal (under about 400 characters)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import reflora
from attach_helpers import LoRANet
from reflora.adapters import NoPairsFoundError, find_pairs

LIMIT = 400
# a fix is an instruction: one of these words comes before the first sentence ends
FIX = re.compile(r"\b(use|pass|call|attach|register|declare|check|build|leave|give|train|wrap|shard|step|"
                 r"set|drop|run|reduce|unfreeze|freeze|install|name|load|expected|expects|must|choose)\b", re.I)


class _AVeryLongModuleNameForAnOptimizerThatNobodyRegistered(torch.optim.Optimizer):
    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 1e-3})

    def step(self, closure=None):
        return None


def _net_opt(opt_cls=torch.optim.AdamW):
    net = LoRANet()
    return net, opt_cls(list(net.parameters()), lr=1e-2) if opt_cls is not None else None


def _unregistered_parameter_space():
    net = LoRANet()
    opt = _AVeryLongModuleNameForAnOptimizerThatNobodyRegistered(list(net.parameters()))
    reflora.attach(opt, net.pairs(), space="parameter")


def _checkpoint_mismatch():
    net, opt = _net_opt()
    state = reflora.attach(opt, net.pairs(), resolved=0.0).state_dict()
    net2, opt2 = _net_opt()
    reflora.attach(opt2, net2.pairs()).load_state_dict(state)


def _state_not_parameter_shaped():
    net, opt = _net_opt()
    net.loss().backward()
    opt.step()
    opt.state[net.A[0]]["exp_avg_sq"] = torch.zeros(3)
    reflora.attach(opt, net.pairs(), space="parameter")


def _frozen():
    A, B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.zeros(8, 4), requires_grad=False)
    reflora.attach(torch.optim.SGD([A, B], lr=0.1), [(A, B)])


def _not_in_optimizer():
    A, B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.zeros(8, 4))
    reflora.attach(torch.optim.SGD([A], lr=0.1), [(A, B)])


def _unreached():
    model = nn.Module()
    model.lora_A = nn.Parameter(torch.randn(4, 8))
    model.lora_B = nn.Parameter(torch.zeros(8, 4))
    model.base = nn.Linear(8, 8)
    model.forward = lambda x: model.base(x)
    find_pairs(model, example_inputs=torch.randn(2, 8))


CASES = {
    "no pairs in a model": (lambda: find_pairs(nn.Sequential(nn.Linear(3, 3))), NoPairsFoundError),
    "no pairs, reflora.func": (lambda: reflora.func.pairs_of(nn.Sequential(nn.Linear(3, 3))), NoPairsFoundError),
    "no pairs reached by example_inputs": (_unreached, NoPairsFoundError),
    "parameter space, unregistered optimizer": (_unregistered_parameter_space, reflora.UnsupportedOptimizerError),
    "closure-only optimizer": (lambda: reflora.attach(torch.optim.LBFGS(list(LoRANet().parameters())), LoRANet().pairs()),
                               reflora.UnsupportedOptimizerError),
    "state not shaped like its parameter": (_state_not_parameter_shaped, reflora.UnsupportedOptimizerError),
    "checkpoint of other options": (_checkpoint_mismatch, ValueError),
    "frozen factor": (_frozen, ValueError),
    "factor not in the optimizer": (_not_in_optimizer, ValueError),
    "swapped factors": (lambda: reflora.refactor(torch.randn(4, 16), torch.randn(8, 3)), ValueError),
    "bad option value": (lambda: reflora.attach(torch.optim.SGD(list(LoRANet().parameters()), lr=0.1),
                                                LoRANet().pairs(), space="params"), ValueError),
    "example_inputs with explicit pairs": (lambda: reflora.attach(torch.optim.SGD(list(LoRANet().parameters()), lr=0.1),
                                                                  LoRANet().pairs(), example_inputs=torch.ones(1)),
                                           TypeError),
}


@pytest.mark.parametrize("name", list(CASES))
def test_error_names_problem_and_fix_first_and_is_short(name) -> None:
    call, exc = CASES[name]
    with pytest.raises(exc) as err:
        call()
    msg = str(err.value).strip("'\"")  # KeyError reprs its message
    assert len(msg) <= LIMIT, f"{len(msg)} characters: {msg}"
    first = re.split(r"\.\s+(?=[A-Z])", msg)[0]
    assert FIX.search(first), f"no fix in the first sentence: {first}"
