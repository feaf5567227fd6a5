"""LoRA (SPEC 2.1; Hu et al., 2021), composable with SIBO (SPEC 2.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .init import device_of, drawn
from .sibo import InitialResidual, branch_input


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = s * B A (LoRA Eq. 3): what merging adds to the frozen weight."""
    return (lora_B.float() @ lora_A.float()) * scaling


def add_rounded_once(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """result + delta, computed in the wider dtype and rounded once to result's (a bf16 backbone's
    output plus an fp32 branch), as HF PEFT and the official SIBO code add a branch."""
    return (result + delta).to(result.dtype)


class LoraLinear(nn.Module):
    """Wraps a frozen nn.Linear:  y = W x + s * B A dropout(x~),  s = alpha / r  (LoRA Eq. 3).

    x~ is x, or SIBO's blend at a SIBO site (blend before dropout, as the official code).
    lora_A: r x in (kaiming-uniform, a=sqrt(5)), lora_B: out x r (zeros): names and shapes of HF PEFT.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 initial_residual: InitialResidual | None = None):
        super().__init__()
        self.base_layer = base_layer
        device = device_of(base_layer)
        self.lora_A = drawn((r, base_layer.in_features), device, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        self.lora_B = drawn((base_layer.out_features, r), device)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._initial_residual = initial_residual

    def add_delta(self, result: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """result + s * B A z. In fp32: s on the r-wide intermediate and the addition fused into the last
        matmul (one pass less over the layer's output than PEFT's order; they differ by fp32 rounding).
        With 16-bit weights (a bf16 backbone with an fp32 adapter, or both bf16 under DeepSpeed): PEFT's
        order, (B A z) s in the adapter's dtype added with one rounding, bit for bit PEFT's output."""
        if not result.dtype == z.dtype == torch.float32:
            return add_rounded_once(result, F.linear(F.linear(z, self.lora_A), self.lora_B) * self.scaling)
        h = F.linear(z, self.lora_A) * self.scaling
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t())
        return out.view(result.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        z = self.dropout(branch_input(self._initial_residual, x).to(self.lora_B_dtype()))
        return self.add_delta(result, z)

    def lora_B_dtype(self) -> torch.dtype:
        """The adapter's working dtype (fp32, or the 16-bit copy DeepSpeed trains with)."""
        return self.lora_B.dtype if isinstance(self.lora_B, torch.Tensor) else self.lora_B[0].dtype
