"""LoRA layouts no finder knows, written as their libraries write them (for traced discovery).

Where the library installs beside this torch (loralib) the tests use it; torchtune 0.6 needs
torchao and torchdata, diffusers' old LoRA layers are gone from recent releases, and minLoRA is
not on PyPI, so their layers are written here as those libraries write them (forward passes
kept op for op, initialisation included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# ------------------------------------------------------------------- torchtune 0.6 (peft/lora.py)


class TorchtuneLoRALinear(nn.Module):
    """torchtune.modules.peft.LoRALinear: ``lora_a`` / ``lora_b`` are ``nn.Linear`` submodules."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        linear = nn.Linear(in_features=in_dim, out_features=out_dim, bias=False)
        self.disabled = False
        self.register_parameter("weight", nn.Parameter(linear.weight))
        self.register_parameter("bias", None)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_features=in_dim, out_features=rank, bias=False)
        self.lora_b = nn.Linear(in_features=rank, out_features=out_dim, bias=False)
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        lora_out = self.lora_a(self.dropout(x))
        lora_out = (self.alpha / self.rank) * self.lora_b(lora_out)
        return out + lora_out


class TorchtuneDoRALinear(nn.Module):
    """torchtune.modules.peft.DoRALinear: LoRA plus a magnitude vector and a detached weight norm."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.scaling = alpha / rank
        linear = nn.Linear(in_features=in_dim, out_features=out_dim, bias=False)
        self.disabled = False
        self.register_parameter("weight", nn.Parameter(linear.weight))
        self.register_parameter("bias", None)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lora_a = nn.Linear(in_features=in_dim, out_features=rank, bias=False)
        self.lora_b = nn.Linear(in_features=rank, out_features=out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.empty(out_dim))
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @torch.no_grad()
    def initialize_dora_magnitude(self) -> None:
        base_weight = self.weight.to(self.lora_a.weight.dtype)
        lora_weight = self.lora_b.weight @ self.lora_a.weight
        self.magnitude.copy_(self._get_weight_norm(base_weight, lora_weight))

    def _get_weight_norm(self, weight, lora_weight):
        weight = weight + self.scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return base_out
        x = self.dropout(x)
        lora_out = self.lora_b(self.lora_a(x))
        x_eye = torch.eye(self.lora_a.weight.shape[1], device=self.lora_a.weight.device, dtype=x.dtype)
        lora_weight = self.lora_b(self.lora_a(x_eye)).T
        magnitude = self.magnitude
        weight = self.weight.to(x.dtype)
        weight_norm = self._get_weight_norm(weight, lora_weight.detach())
        weight_norm = weight_norm.detach()
        mag_norm_scale = (magnitude / weight_norm).view(1, -1)
        dora_out = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return dora_out + base_out


class TorchtuneStyleMLP(nn.Module):
    """A feed-forward block built from torchtune layers, as torchtune's ``lora_llama`` builders do."""

    def __init__(self, dora: bool = False) -> None:
        super().__init__()
        cls = TorchtuneDoRALinear if dora else TorchtuneLoRALinear
        self.w1 = cls(16, 24, rank=4, alpha=8, dropout=0.1)
        self.w2 = cls(24, 16, rank=4, alpha=8, dropout=0.1)
        for p in (self.w1.weight, self.w2.weight):
            p.requires_grad_(False)
        if dora:
            for m in (self.w1, self.w2):
                m.initialize_dora_magnitude()

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


# ------------------------------------------------------------ DeepSpeed-Chat (utils/module/lora.py)


class LinearLayer_LoRA(nn.Module):
    """DeepSpeed-Chat's LoRA: ``lora_right_weight`` (in, r) applied first, ``lora_left_weight`` (r, out)."""

    def __init__(self, weight, lora_dim=0, lora_scaling=1, lora_droppout=0, bias=None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        rows, columns = weight.shape
        self.lora_right_weight = nn.Parameter(torch.zeros(columns, lora_dim))  # stored transposed
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, rows))
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_droppout) if lora_droppout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_left_weight)
        self.weight.requires_grad = False
        self.fuse_lora = False

    def forward(self, input):
        if self.fuse_lora:
            return F.linear(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias) + (
            self.lora_dropout(input) @ self.lora_right_weight @ self.lora_left_weight
        ) * self.lora_scaling


class DeepSpeedChatModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        base = nn.Linear(16, 12)
        self.proj = LinearLayer_LoRA(base.weight, lora_dim=4, lora_scaling=8, lora_droppout=0.1, bias=base.bias)
        self.proj.bias.requires_grad_(False)
        self.out = LinearLayer_LoRA(nn.Linear(12, 8).weight, lora_dim=2)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


# ----------------------------------------------------- diffusers (models/lora.py, before 0.30)


class LoRALinearLayer(nn.Module):
    def __init__(self, in_features, out_features, rank=4, network_alpha=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        self.network_alpha = network_alpha
        self.rank = rank
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states):
        orig_dtype = hidden_states.dtype
        dtype = self.down.weight.dtype
        down_hidden_states = self.down(hidden_states.to(dtype))
        up_hidden_states = self.up(down_hidden_states)
        if self.network_alpha is not None:
            up_hidden_states *= self.network_alpha / self.rank
        return up_hidden_states.to(orig_dtype)


class LoRAConv2dLayer(nn.Module):
    def __init__(self, in_features, out_features, rank=4, kernel_size=(1, 1), stride=(1, 1), padding=0,
                 network_alpha=None):
        super().__init__()
        self.down = nn.Conv2d(in_features, rank, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.up = nn.Conv2d(rank, out_features, kernel_size=(1, 1), stride=(1, 1), bias=False)
        self.network_alpha = network_alpha
        self.rank = rank
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states):
        orig_dtype = hidden_states.dtype
        dtype = self.down.weight.dtype
        down_hidden_states = self.down(hidden_states.to(dtype))
        up_hidden_states = self.up(down_hidden_states)
        if self.network_alpha is not None:
            up_hidden_states *= self.network_alpha / self.rank
        return up_hidden_states.to(orig_dtype)


class LoRACompatibleLinear(nn.Linear):
    def __init__(self, *args, lora_layer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_layer = lora_layer

    def forward(self, hidden_states, scale: float = 1.0):
        out = super().forward(hidden_states)
        if self.lora_layer is None:
            return out
        return out + (scale * self.lora_layer(hidden_states))


class LoRACompatibleConv(nn.Conv2d):
    def __init__(self, *args, lora_layer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_layer = lora_layer

    def forward(self, hidden_states, scale: float = 1.0):
        out = F.conv2d(hidden_states, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.lora_layer is None:
            return out
        return out + (scale * self.lora_layer(hidden_states))


class DiffusersStyleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = LoRACompatibleConv(3, 6, 3, padding=1, lora_layer=LoRAConv2dLayer(3, 6, 2, (3, 3), padding=1))
        self.to_q = LoRACompatibleLinear(6, 6, lora_layer=LoRALinearLayer(6, 6, 2, network_alpha=4))
        for name, p in self.named_parameters():
            p.requires_grad_("lora_layer" in name)

    def forward(self, x):
        h = self.conv(x)  # (b, 6, H, W)
        return self.to_q(h.flatten(2).transpose(1, 2))


# --------------------------------------------------------------------- minLoRA (minlora/model.py)


class LoRAParametrization(nn.Module):
    def __init__(self, fan_in, fan_out, fan_in_fan_out=False, rank=4, lora_dropout_p=0.0, lora_alpha=1):
        super().__init__()
        self.swap = (lambda x: (x[1], x[0])) if fan_in_fan_out else (lambda x: x)
        self.lora_A = nn.Parameter(torch.zeros(self.swap((rank, fan_in))))
        self.lora_B = nn.Parameter(torch.zeros(self.swap((fan_out, rank))))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_alpha, self.rank = lora_alpha, rank
        self.scaling = lora_alpha / rank
        self.lora_dropout = nn.Dropout(p=lora_dropout_p) if lora_dropout_p > 0 else lambda x: x
        self.dropout_fn = self._dropout if lora_dropout_p > 0 else lambda x: x
        self.register_buffer("lora_dropout_mask", torch.ones(self.swap((1, fan_in)), dtype=self.lora_A.dtype))
        self.disabled = False

    def _dropout(self, A):
        return A * self.lora_dropout(self.lora_dropout_mask)

    def lora_forward(self, X):
        return X + torch.matmul(*self.swap((self.lora_B, self.dropout_fn(self.lora_A)))).view(X.shape) * self.scaling

    def forward(self, X):
        return X if self.disabled else self.lora_forward(X)

    @classmethod
    def from_linear(cls, layer, rank=4, lora_dropout_p=0.0, lora_alpha=1):
        fan_out, fan_in = layer.weight.shape
        return cls(fan_in, fan_out, fan_in_fan_out=False, rank=rank, lora_dropout_p=lora_dropout_p, lora_alpha=lora_alpha)

    @classmethod
    def from_conv2d(cls, layer, rank=4, lora_dropout_p=0.0, lora_alpha=1):
        fan_out, fan_in = layer.weight.view(layer.weight.shape[0], -1).shape
        return cls(fan_in, fan_out, fan_in_fan_out=False, rank=rank, lora_dropout_p=lora_dropout_p, lora_alpha=lora_alpha)


def minlora_add_lora(model: nn.Module) -> nn.Module:
    """minlora.add_lora with the default config (Linear and Conv2d weights, rank 4)."""
    for layer in list(model.modules()):
        if isinstance(layer, nn.Linear):
            parametrize.register_parametrization(layer, "weight", LoRAParametrization.from_linear(layer, lora_dropout_p=0.1))
        elif isinstance(layer, nn.Conv2d):
            parametrize.register_parametrization(layer, "weight", LoRAParametrization.from_conv2d(layer))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


class MinLoRANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


# ------------------------------------------------------------------------------ arbitrary names


class Arbitrary(nn.Module):
    """A research codebase's LoRA: raw parameters, no ``lora`` in any name, several forms."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(12, 16, generator=g) / 4, requires_grad=False)
        self.U = nn.Parameter(torch.randn(3, 16, generator=g))  # (r, m)
        self.V = nn.Parameter(torch.zeros(12, 3))  # (n, r)
        self.left = nn.Parameter(torch.randn(12, 2, generator=g))  # (m, r), stored transposed
        self.right = nn.Parameter(torch.zeros(2, 8))  # (r, n), stored transposed
        self.sandwich = nn.ModuleDict({"alpha": nn.Linear(8, 3, bias=False), "omega": nn.Linear(3, 8, bias=False)})

    def forward(self, x):
        h = x @ (self.W + torch.einsum("nr,rm->nm", self.V, self.U)).T  # product form, einsum
        h = torch.tanh(h)
        y = h @ self.left @ self.right  # chain, transposed storage
        return y + self.sandwich["omega"](0.5 * self.sandwich["alpha"](y))
