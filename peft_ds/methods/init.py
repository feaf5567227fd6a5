"""Initial values of adapter parameters: drawn on the CPU by the CPU generator, then placed on the device
of the weight they adapt. The training loop seeds that generator (`fork_rng(devices=[])`, `manual_seed`);
a draw on a GPU would use the GPU's own generator, which it neither seeds nor protects, so a GPU run
would start from other adapters than a CPU run, or a run on another number of GPUs."""

from __future__ import annotations

import torch
from torch import nn


def device_of(base_layer: nn.Module) -> torch.device:
    """Where the adapters of `base_layer` live: its weight's device (meta for a skeleton)."""
    return base_layer.weight.device


def drawn(shape, device, fill=None) -> nn.Parameter:
    """A parameter of `shape` (fp32): zeros, or filled in place by `fill` on the CPU, placed on `device`.
    On the meta device nothing is drawn (a skeleton has no values)."""
    device = torch.device(device)
    if device.type == "meta":
        return nn.Parameter(torch.empty(shape, device="meta"))
    value = torch.zeros(shape, device="cpu")
    if fill is not None:
        fill(value)
    return nn.Parameter(value.to(device))


def normal(std: float):
    """`fill` for N(0, std^2)."""
    return lambda t: t.normal_(0.0, std)
