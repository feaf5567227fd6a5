"""SIBO: initial residual (SPEC 2.3; Wen et al., ACL 2024).

The PEFT branch at a SIBO site sees  x~ = (1 - lambda) x + lambda h0  (SIBO Eq. 4), where h0 is the
raw token-embedding output of the same forward pass.

How h0 travels (no state survives a forward):
- a hook on the token embedding records h0 of the forward in progress; hooks on the inner model clear
  it before and after every forward;
- each decoder layer's forward takes that h0 as an explicit argument and makes it (with the layer's
  lambda) the active residual while the layer runs. Under activation checkpointing h0 is an argument
  of the checkpointed function, so recomputation in backward sees the very same tensor;
- sites read the active (h0, lambda) through `InitialResidual.blend`; outside a layer's forward there
  is nothing to read and a site fails loudly instead of using a stale h0.
With a KV cache each generation step embeds only its new tokens, so h0 covers exactly those tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn


class InitialResidual:
    """Holder of h0 for one model; plain object (not a Module) so it never enters a state dict."""

    def __init__(self, lam: float, learnable: bool):
        self.lam = lam
        self.learnable = learnable
        self._h0 = None  # h0 of the forward in progress
        self._active = []  # (h0, lambda) of the decoder layer running now

    def reset(self) -> None:
        self._h0 = None

    def capture(self, h0: torch.Tensor) -> None:
        if self._h0 is None:  # GPT-J embeds token_type_ids with the same module afterwards
            self._h0 = h0

    def current_h0(self) -> torch.Tensor:
        if self._h0 is None:
            raise RuntimeError("SIBO: no h0 for this forward (the token embedding did not run)")
        return self._h0

    @contextlib.contextmanager
    def active(self, h0: torch.Tensor, lam):
        self._active.append((h0, lam))
        try:
            yield
        finally:
            self._active.pop()

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        if not self._active:
            raise RuntimeError("SIBO site called outside a decoder layer's forward: no h0 is active")
        h0, lam = self._active[-1]
        if torch.is_tensor(lam):
            lam = lam.to(x.dtype)
        if h0.dtype != x.dtype:
            h0 = h0.to(x.dtype)
        return torch.lerp(x, h0, lam)  # SIBO Eq. 4: (1 - lambda) x + lambda h0, one fused op


def branch_input(residual: InitialResidual | None, x: torch.Tensor) -> torch.Tensor:
    """What a PEFT branch sees: x, or SIBO's blend at a SIBO site."""
    return x if residual is None else residual.blend(x)


def lambda_logit(lam: float) -> float:
    return math.log(lam / (1 - lam))


def layer_lambda(layer: nn.Module):
    """Beyond the paper (its future work): lambda = sigmoid(theta), one theta per decoder layer."""
    theta = getattr(layer, "sibo_theta", None)
    return layer._initial_residual.lam if theta is None else torch.sigmoid(theta)


# ---- hooks and the decoder-layer wrapper; module-level functions so deepcopy rebinds them -------


def _reset_hook(module, args, kwargs):
    module._initial_residual.reset()
    if kwargs.get("inputs_embeds") is not None:  # the caller embedded the tokens itself
        module._initial_residual.capture(kwargs["inputs_embeds"])


def _clear_hook(module, args, kwargs, output):
    module._initial_residual.reset()


def _capture_hook(module, args, output):
    module._initial_residual.capture(output)


def _blend_input_hook(module, args):
    """Whole-input site (official GPT-J Adapter-SIBO): the frozen path sees x~ too."""
    return (module._initial_residual.blend(args[0]),) + tuple(args[1:])


# Cache arguments that a checkpointed layer must not write twice (names differ between layers and
# transformers versions); `use_cache` is turned off likewise, as transformers does under checkpointing.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


@contextlib.contextmanager
def _own_checkpointing(layer):
    """transformers' checkpointing of this layer switched off while peft-ds checkpoints it: whatever
    transformers wraps around a layer's forward (a wrapper, a `__call__`, nothing) reads only the
    layer's documented `gradient_checkpointing` flag, so the layer runs as is, never checkpointed twice."""
    enabled = layer.__dict__.get("gradient_checkpointing")
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if enabled is None:
            del layer.gradient_checkpointing
        else:
            layer.gradient_checkpointing = enabled


def _run_layer(layer, kwargs, h0, *args):
    with layer._initial_residual.active(h0, layer_lambda(layer)), _own_checkpointing(layer):
        return type(layer).forward(layer, *args, **kwargs)


def _layer_forward(self, *args, **kwargs):
    """The decoder layer's forward with h0 active. Checkpointed (when transformers would checkpoint it)
    with h0 as an argument of the checkpointed function, so the recomputation in backward sees it too."""
    h0 = self._initial_residual.current_h0()
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            kwargs.update({name: None for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None})
        return self._gradient_checkpointing_func(functools.partial(_run_layer, self, kwargs), h0, *args)
    return _run_layer(self, kwargs, h0, *args)


def attach(embedding: nn.Module, base_model: nn.Module, layers, whole_input_sites, residual: InitialResidual):
    """Wire h0 from `embedding` to every decoder layer in `layers`; learnable lambda adds `sibo_theta`."""
    for module in (embedding, base_model, *layers, *whole_input_sites):
        module._initial_residual = residual
    embedding.register_forward_hook(_capture_hook)
    base_model.register_forward_pre_hook(_reset_hook, with_kwargs=True)
    base_model.register_forward_hook(_clear_hook, with_kwargs=True)
    for layer in layers:
        layer.forward = _layer_forward.__get__(layer)
        if residual.learnable:
            theta = torch.full((1,), lambda_logit(residual.lam), dtype=torch.float32)
            layer.sibo_theta = nn.Parameter(theta.to(next(layer.parameters()).device))
    for module in whole_input_sites:
        module.register_forward_pre_hook(_blend_input_hook)
