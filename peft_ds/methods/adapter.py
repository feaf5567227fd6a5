"""Bottleneck adapter (SPEC 2.2; Houlsby et al., 2019, as in LLM-Adapters), composable with SIBO."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import device_of, drawn, normal
from .sibo import InitialResidual, branch_input

# LLM-Adapters takes f from transformers' ACT2FN; these are the same functions (gelu: the exact erf
# form), without importing transformers into every tool that reads adapters.
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class AdapterLinear(nn.Module):
    """Wraps a frozen nn.Linear with  a(x) = x + scale * U f(D dropout(x~)).

    Input side (LLaMA gate_proj/up_proj): y = W a(x). Output side (GPT-J fc_out): y = a(W x).
    The residual is always the original x; only the branch sees SIBO's blend x~.
    adapter_down D: bottleneck x d, adapter_up U: d x bottleneck, both N(0, 0.02) ("bert" init), no bias.
    """

    def __init__(self, base_layer: nn.Linear, bottleneck_size: int, non_linearity: str, dropout: float,
                 scale: float, output_side: bool, initial_residual: InitialResidual | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.output_side = output_side
        d = base_layer.out_features if output_side else base_layer.in_features
        device = device_of(base_layer)
        self.adapter_down = drawn((bottleneck_size, d), device, normal(0.02))
        self.adapter_up = drawn((d, bottleneck_size), device, normal(0.02))
        self.non_linearity = non_linearity
        self.activation = ACTIVATIONS[non_linearity]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        self._initial_residual = initial_residual

    def branch(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activation(F.linear(z, self.adapter_down)), self.adapter_up) * self.scale

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dropout(branch_input(self._initial_residual, x).to(self.adapter_up_dtype()))
        return x + self.branch(z).to(x.dtype)

    def adapter_up_dtype(self) -> torch.dtype:
        """The adapter's working dtype (fp32, or the 16-bit copy DeepSpeed trains with)."""
        return self.adapter_up.dtype if isinstance(self.adapter_up, torch.Tensor) else self.adapter_up[0].dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_side:
            return self.adapt(self.base_layer(x))
        return self.base_layer(self.adapt(x))
