"""The one place that resolves DeepSpeed settings (SPEC 3): batch sizes from the run config, the
precision from the model dtype, and every "auto" from the model's hidden size (the transformers
Trainer formulas), so that no "auto" ever reaches DeepSpeed (it silently drops them)."""

from __future__ import annotations

import copy

import torch

from .errors import PeftDsError, read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ZERO_STAGES = (0, 1, 2, 3)


def load(path: str) -> dict:
    """The DeepSpeed JSON at `path`, with what DeepSpeed would only reject after the model is built
    (its sections' types, the ZeRO stage) checked now."""
    config = read_json(path, "DeepSpeed config")
    if not isinstance(config, dict):
        raise PeftDsError(f"DeepSpeed config {path} must be a JSON object")
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(config.get(section, {}), dict):
            raise PeftDsError(f"DeepSpeed config {path}: {section} must be a JSON object, got {config[section]!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if type(stage) is not int or stage not in ZERO_STAGES:
        raise PeftDsError(f"DeepSpeed config {path}: zero_optimization.stage must be one of "
                          f"{', '.join(map(str, ZERO_STAGES))}, got {stage!r}")
    if offloads_optimizer(config) and config.get("zero_force_ds_cpu_optimizer") is True:
        raise PeftDsError(f"DeepSpeed config {path}: zero_force_ds_cpu_optimizer true asks for DeepSpeed's CPU "
                          f"Adam, but peft-ds builds its own AdamW over the adapters: set it false (or leave it "
                          f"out) with offload_optimizer")
    return config


def offloads_optimizer(config: dict) -> bool:
    """Whether ZeRO keeps the optimizer state (and its step) on the host or NVMe."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def model_dtype(config: dict, requested: str) -> str:
    """fp32 / bf16 / fp16: the run config's model.dtype, or (auto) what the DeepSpeed config enables."""
    if requested != "auto":
        return requested
    if config.get("bf16", {}).get("enabled") is True and config.get("fp16", {}).get("enabled") is True:
        raise PeftDsError("the DeepSpeed config enables both bf16 and fp16 and model.dtype is auto: enable "
                          "one of them, or set model.dtype")
    if config.get("bf16", {}).get("enabled") is True:
        return "bf16"
    if config.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def _find_auto(value, path=""):
    if value == "auto":
        return path
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_auto(item, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def resolve(config: dict, *, hidden_size: int, micro_batch_size: int, accumulation: int, world_size: int,
            dtype: str) -> dict:
    """A copy of `config` with every "auto" and every batch/precision setting filled in."""
    ds = copy.deepcopy(config)
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = micro_batch_size * accumulation * world_size
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    formulas = {  # transformers HfTrainerDeepSpeedConfig.trainer_config_finalize
        "reduce_bucket_size": hidden_size * hidden_size,
        "allgather_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in formulas.items():
        if zero.get(key) == "auto":
            zero[key] = value
    ds.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is torch's AdamW over adapters
    if offloads_optimizer(ds):
        # torch's AdamW steps the offloaded fp32 adapter partitions on the host: the adapters' state is MBs,
        # where DeepSpeed's CPU Adam (which DeepSpeed demands by default) would need a JIT-built op per node
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    left = _find_auto(ds)
    if left:
        raise PeftDsError(f"DeepSpeed config key {left} is \"auto\" and peft-ds cannot resolve it; set a value")
    return ds
