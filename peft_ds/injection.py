"""Injection: walk a LlamaForCausalLM / GPTJForCausalLM, wrap the target linears, freeze the backbone,
wire SIBO's h0; plus the adapter state dict (the adapter file format) and the trainable report.

Adapter state-dict keys: `<dotted path of the wrapped base module inside the CausalLM>.<name>`, e.g.
`model.layers.0.mlp.up_proj.lora_A`; learnable SIBO adds `<decoder layer path>.sibo_theta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import OrderedDict

import torch
from torch import nn

from . import architectures
from .errors import PeftDsError
from .methods import (ADAPTER_PARAMETER_NAMES, PEFT_LAYERS, SIBO_PARAMETER, AdamixAdapterLinear, AdamixLoraLinear,
                      AdapterLinear, BiLoraLinear, InitialResidual, LoraLinear, Router, adamix, method_name, sibo)
from .spec import ADAPTER_FAMILY, PeftSpec

_ADAPTER_KEY = re.compile(r"(^|\.)(" + "|".join(ADAPTER_PARAMETER_NAMES) + r")(\.\d+)?$")


def is_adapter_key(name: str) -> bool:
    return _ADAPTER_KEY.search(name) is not None


def _plan_targets(layers, targets):
    """[(layer_index, relative name, module)] of every module to wrap; checks every target exists."""
    plan, found = [], set()
    for index, layer in enumerate(layers):
        for rel, module in layer.named_modules():
            if rel and architectures.matches(rel, targets):
                if not isinstance(module, nn.Linear):
                    raise PeftDsError(f"target module {rel!r} is a {type(module).__name__}, not a Linear")
                plan.append((index, rel, module))
                found.update(t for t in targets if rel == t or rel.endswith("." + t))
    missing = [t for t in targets if t not in found]
    if missing:
        names = sorted({rel for rel, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
        raise PeftDsError(
            f"target module(s) {', '.join(missing)} not found in the model's decoder layers "
            f"(linear layers there: {', '.join(names)})"
        )
    return plan


def _plan_sites(arch, spec, layers, targets, hidden):
    """Relative names of the SIBO sites in a decoder layer, each checked for an input of hidden size."""
    if spec.sibo_sites is not None:
        sites = list(spec.sibo_sites)
    else:
        sites = [s for s in arch.sibo_sites[spec.method] if s in architectures.WHOLE_INPUT_SITES or s in targets]
        if not sites:
            raise PeftDsError(
                f"none of the default SIBO sites ({', '.join(arch.sibo_sites[spec.method])}) is among "
                f"target_modules; set sibo_sites explicitly"
            )
    layer = layers[0]
    relative = []
    for site in sites:
        matched = [(rel, m) for rel, m in layer.named_modules() if rel and architectures.matches(rel, [site])]
        if not matched:
            raise PeftDsError(f"SIBO site {site!r} not found in the model's decoder layers")
        for rel, module in matched:
            if architectures.matches(rel, targets):
                output_side = spec.method in ADAPTER_FAMILY and architectures.matches(rel, arch.output_side)
                size = module.out_features if output_side else module.in_features
            elif site in architectures.WHOLE_INPUT_SITES:
                size = next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features
            else:
                raise PeftDsError(
                    f"SIBO site {site!r} is not among target_modules ({', '.join(targets)}); a site must be "
                    f"an adapted module, or {'/'.join(architectures.WHOLE_INPUT_SITES)} for the whole-input variant"
                )
            if size != hidden:
                raise PeftDsError(
                    f"SIBO site {rel!r} has input size {size}, not the hidden size {hidden}: h0 cannot be blended there"
                )
            relative.append(rel)
    return sites, relative


def _wrap(spec, arch, rel, module, residual, router):
    dropout, output_side = spec.effective_dropout, architectures.matches(rel, arch.output_side)
    if spec.method == "lora":
        return LoraLinear(module, spec.r, spec.alpha, dropout, residual)
    if spec.method == "adapter":
        return AdapterLinear(module, spec.bottleneck_size, spec.non_linearity, dropout, spec.adapter_scale,
                             output_side, residual)
    if spec.method == "bilora":
        return BiLoraLinear(module, spec.r, spec.alpha, dropout, spec.singular_values, residual)
    if spec.method == "adamix_lora":
        return AdamixLoraLinear(module, spec.r, spec.alpha, dropout, spec.num_experts, spec.share_A, spec.share_B,
                                router, residual)
    return AdamixAdapterLinear(module, spec.bottleneck_size, spec.non_linearity, dropout, spec.adapter_scale,
                               output_side, spec.num_experts, spec.share_down, spec.share_up, router, residual)


def apply_peft(model: nn.Module, spec: PeftSpec) -> nn.Module:
    """Inject `spec`'s adapters into `model` in place, freeze every backbone parameter, wire SIBO."""
    spec = spec.validate()
    arch = architectures.detect(model)
    if getattr(model, "peft_spec", None) is not None:
        raise PeftDsError("the model already has adapters (apply_peft was called twice)")
    layers = model.get_submodule(arch.layers)
    hidden = architectures.hidden_size(model)
    targets = list(spec.target_modules or architectures.default_targets(arch, spec.method))
    plan = _plan_targets(layers, targets)
    site_names, sites = _plan_sites(arch, spec, layers, targets, hidden) if spec.sibo else (None, [])

    for param in model.parameters():
        param.requires_grad_(False)
    residual = InitialResidual(spec.sibo_lambda, spec.sibo_learnable) if spec.sibo else None
    # AdaMix routes come from their own generator, seeded from the caller's RNG (identical on all ranks)
    router = Router(spec.num_experts, int(torch.randint(2**62, (1,)))) if spec.method.startswith("adamix") else None
    for index, rel, module in plan:
        parent_name, _, child = rel.rpartition(".")
        parent = layers[index].get_submodule(parent_name) if parent_name else layers[index]
        site_residual = residual if rel in sites else None
        setattr(parent, child, _wrap(spec, arch, rel, module, site_residual, router).train(model.training))
    if router is not None:
        adamix.attach_router(model, model.get_submodule(arch.base_model), router)
    if residual is not None:
        whole_input = [layer.get_submodule(rel) for layer in layers for rel in sites
                       if not architectures.matches(rel, targets)]
        sibo.attach(model.get_submodule(arch.embedding), model.get_submodule(arch.base_model),
                    list(layers), whole_input, residual)
    # the resolved spec: explicit targets and sites, so a saved or merged spec means the same anywhere
    model.peft_spec = dataclasses.replace(spec, target_modules=targets, sibo_sites=site_names)
    return model


# ---- state dict --------------------------------------------------------------------------------


@contextlib.contextmanager
def _gathered(params, modifier_rank=None):
    """Full tensors of ZeRO-3-partitioned parameters inside the block (a no-op without ZeRO-3)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def adapter_parameters(model: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    return OrderedDict((n, p) for n, p in model.named_parameters() if is_adapter_key(n))


def adapter_state_dict(model: nn.Module) -> "dict[str, torch.Tensor]":
    """Full (gathered) fp32-or-native copies of every adapter parameter, keyed as in the module doc."""
    params = adapter_parameters(model)
    if not params:
        raise PeftDsError("the model has no adapters (call apply_peft first)")
    with _gathered(list(params.values())):
        return OrderedDict((n, p.detach().clone()) for n, p in params.items())


def adapter_shapes(model: nn.Module, spec: PeftSpec) -> "OrderedDict[str, tuple]":
    """The adapter keys and shapes `apply_peft(model, spec)` would create, found without touching the
    model: the same wrappers built around meta-device stand-ins of the target linears."""
    spec = spec.validate()
    arch = architectures.detect(model)
    layers = model.get_submodule(arch.layers)
    targets = list(spec.target_modules or architectures.default_targets(arch, spec.method))
    plan = _plan_targets(layers, targets)
    residual = InitialResidual(spec.sibo_lambda, spec.sibo_learnable) if spec.sibo else None
    router = Router(spec.num_experts, 0) if spec.method.startswith("adamix") else None
    shapes = OrderedDict()
    with torch.device("meta"):
        for index, rel, module in plan:
            stand_in = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            wrapper = _wrap(spec, arch, rel, stand_in, residual, router)
            for name, param in wrapper.named_parameters():
                if is_adapter_key(name):
                    shapes[f"{arch.layers}.{index}.{rel}.{name}"] = tuple(param.shape)
    if spec.sibo and spec.sibo_learnable:
        for index in range(len(layers)):
            shapes[f"{arch.layers}.{index}.{SIBO_PARAMETER}"] = (1,)
    return shapes


def check_adapter_state(shapes: "dict[str, tuple]", state: "dict[str, torch.Tensor]") -> None:
    """`state` has exactly the keys of `shapes` ({key: shape}), each of its shape."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[0]}")
        raise PeftDsError("adapter state dict does not fit the model: " + "; ".join(parts))
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            raise PeftDsError(f"adapter tensor {name} has shape {tuple(state[name].shape)}, the model expects "
                              f"{tuple(shape)}")


def load_adapter_state_dict(model: nn.Module, state: "dict[str, torch.Tensor]") -> None:
    """Copy `state` into the model's adapter parameters; keys and shapes must match exactly (checked
    before any parameter is written)."""
    params = adapter_parameters(model)
    check_adapter_state(OrderedDict((n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in params.items()), state)
    with _gathered(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.dtype))


# ---- report ------------------------------------------------------------------------------------


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def trainable_report(model: nn.Module) -> dict:
    """Trainable vs total parameters, with adapter parameters per method and module kind."""
    rows = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, PEFT_LAYERS):
            key = (method_name(module), name.rsplit(".", 1)[-1])
            own = [p for n, p in module.named_parameters() if not n.startswith("base_layer.")]
        elif hasattr(module, "sibo_theta") and isinstance(module.sibo_theta, nn.Parameter):
            key, own = ("sibo", "layer lambda"), [module.sibo_theta]
        else:
            continue
        row = rows.setdefault(key, {"method": key[0], "module": key[1], "modules": 0, "params": 0})
        row["modules"] += 1
        row["params"] += sum(_numel(p) for p in own)
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total, "rows": list(rows.values())}


def format_report(report: dict) -> str:
    lines = [f"{'method':<15} {'module':<14} {'modules':>8} {'params':>12}"]
    for row in report["rows"]:
        lines.append(f"{row['method']:<15} {row['module']:<14} {row['modules']:>8} {row['params']:>12,}")
    lines.append(
        f"trainable {report['trainable']:,} of {report['total']:,} parameters ({report['percent']:.4f}%)"
    )
    return "\n".join(lines)
