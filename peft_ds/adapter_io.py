"""Adapter files. Native: `adapter.safetensors` (keys as in `peft_ds.injection`) and `adapter_config.json`
(method, PeftSpec, base model name/path, signature and config hash, provenance, dtype, sha256 per
tensor). Hugging Face PEFT: `adapter_model.safetensors` + `adapter_config.json`, for a plain LoRA
without SIBO. Safetensors only: no pickles."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch

from .ds_config import DTYPES
from .errors import PeftDsError, read_json
from . import outputs
from .injection import adapter_shapes, adapter_state_dict, apply_peft, check_adapter_state, load_adapter_state_dict
from .spec import PeftSpec
from .version import __version__

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "peft-ds-adapter"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Config keys that say how a model was saved or run, not what it computes: left out of the config hash.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache",
             "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict"}


def signature(config: dict) -> dict:
    """What an adapter must match in its base: architecture, width and depth (from a config dict,
    a Hugging Face `config.json` or `config.to_dict()`)."""
    return {"model_type": config.get("model_type"),
            "hidden_size": config.get("hidden_size") or config.get("n_embd"),
            "num_hidden_layers": config.get("num_hidden_layers") or config.get("n_layer")}


def model_signature(model) -> dict:
    return signature(model.config.to_dict())


def config_hash(config: dict) -> str:
    """sha256 of a base model's configuration (`config.to_dict()`), without the keys in _VOLATILE."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def base_description(model) -> dict:
    """The `base` entry of checkpoint metas and adapter configs."""
    config = model.config.to_dict()
    return {**signature(config), "config_sha256": config_hash(config)}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (C order, its own dtype)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def provenance(tool: str, tag_dir: str, world_size: int, step: int | None, trained_method: str,
               transforms=(), model_dtype: str | None = None) -> dict:
    """Where an adapter came from, in the one layout of adapter_config.json whether `peft-ds train` or
    `peft-ds consolidate` wrote it: the checkpoint (tag directory) its tensors are, the ranks that wrote
    it, its step, the method it was trained with, the backbone's dtype in that run (`peft-ds evaluate`
    generates in it on a GPU), and what was done to it since (merged, folded)."""
    return {"source": {"tool": tool, "checkpoint": os.path.abspath(tag_dir), "tag": os.path.basename(tag_dir),
                       "world_size": world_size, "step": step, "trained_method": trained_method,
                       "model_dtype": model_dtype},
            "transforms": list(transforms)}


def write_adapter(state: dict, out_dir: str, spec: PeftSpec, base_model: str | None, base: dict,
                  extra: dict | None = None, dtype: str = "fp32") -> dict:
    """Write `state` as a native adapter into `out_dir` (a fresh directory: `save_adapter` and
    `peft-ds consolidate` give it a staging directory of `peft_ds.outputs`); returns the config written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(DTYPES[dtype]).cpu().contiguous() for k, v in state.items()}
    config = {"format": FORMAT, "peft_ds_version": __version__, "method": spec.method, "peft_spec": spec.to_dict(),
              "base_model": base_model, "base": base, **(extra or {}), "dtype": dtype,
              "sha256": {k: tensor_sha256(v) for k, v in tensors.items()}}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt", "producer": FORMAT})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return config


def save_adapter(model, out_dir: str, base_model: str | None = None, extra: dict | None = None,
                 state: dict | None = None) -> str:
    """Write `state` (default: the model's adapter state dict) as a native adapter directory: built
    beside `out_dir` and swapped in whole (a previous adapter there stays readable until then)."""
    state = adapter_state_dict(model) if state is None else state
    with outputs.replace_dir(out_dir) as staging:
        write_adapter({k: v.float() for k, v in state.items()}, staging, model.peft_spec, base_model,
                      base_description(model), extra)
    return out_dir


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG)
    if not os.path.isfile(path):
        raise PeftDsError(f"adapter directory {adapter_dir} has no {CONFIG}")
    config = read_json(path, "adapter config")
    if config.get("format") != FORMAT:
        raise PeftDsError(f"{path} is not a peft-ds adapter config (format {config.get('format')!r})")
    if not os.path.isfile(os.path.join(adapter_dir, WEIGHTS)):
        raise PeftDsError(f"adapter directory {adapter_dir} has no {WEIGHTS}")
    return config


def preset_depth(adapter_config: dict, base: str, num_layers: int | None) -> int | None:
    """The depth to build a preset `base` at for an adapter: `num_layers` when given, else the depth the
    adapter was trained on (a model directory is always taken whole: None)."""
    from .models import PRESETS

    if num_layers is not None or base not in PRESETS:
        return num_layers
    return signature(adapter_config["base"])["num_hidden_layers"]


def read_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(config, tensors) of a native adapter directory, every tensor checked against its sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, WEIGHTS)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise PeftDsError(f"cannot read {path}: {err}") from None
    expected = config.get("sha256")
    if expected is not None:
        if set(expected) != set(state):
            odd = sorted(set(expected) ^ set(state))[0]
            raise PeftDsError(f"{path} does not hold the tensors its config lists (e.g. {odd})")
        for name, tensor in state.items():
            if tensor_sha256(tensor) != expected[name]:
                raise PeftDsError(f"{path}: tensor {name} fails its sha256 checksum (the file was modified or "
                                  f"corrupted)")
    return config, state


def load_adapter(model, adapter_dir: str):
    """Apply the saved PeftSpec to a fresh backbone and load the (checksum-verified) adapter weights.
    SIBO keeps its h0 path; the result is ready for inference and `generate()`. Every check (files,
    checksums, base, spec, tensor names and shapes) runs before the model is touched: a failed load
    leaves it as it was."""
    config, state = read_adapter(adapter_dir)
    base = config["base"]
    actual = model_signature(model)
    if {k: base.get(k) for k in actual} != actual:
        raise PeftDsError(f"adapter {adapter_dir} was trained on {signature(base)}, the base model is {actual}")
    if base.get("config_sha256") and base["config_sha256"] != config_hash(model.config.to_dict()):
        warnings.warn(f"adapter {adapter_dir}: the base model's configuration differs from the one it was trained "
                      f"on (same architecture and size; check rope scaling, vocabulary, norms)", stacklevel=2)
    spec = PeftSpec.from_dict(config["peft_spec"])
    try:
        check_adapter_state(adapter_shapes(model, spec), state)
    except PeftDsError as err:
        raise PeftDsError(f"adapter {adapter_dir}: {err}") from None
    apply_peft(model, spec)
    load_adapter_state_dict(model, state)
    return model


# ---- Hugging Face PEFT ---------------------------------------------------------------------------


def peft_refusal(spec: PeftSpec) -> str | None:
    """Why `spec` has no Hugging Face PEFT form (None: it has one). PEFT's LoRA is y = W x + s B A x."""
    if spec.method != "lora":
        return (f"method {spec.method} is not a plain LoRA (only LoRA, merged AdaMix-LoRA and folded BiLoRA "
                f"export to PEFT); use --format native and peft_ds.load_adapter")
    if spec.sibo:
        return ("SIBO is on: PEFT's LoRA has no initial-residual (h0) path, so the export would compute "
                "something else; use --format native and peft_ds.load_adapter")
    return None


def write_peft(state: dict, out_dir: str, spec: PeftSpec, base_model: str | None, dtype: str = "fp32") -> dict:
    """`adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads,
    written into `out_dir` (a fresh directory, as for `write_adapter`)."""
    from safetensors.torch import save_file

    reason = peft_refusal(spec)
    if reason:
        raise PeftDsError(f"no PEFT export: {reason}")
    tensors = {f"base_model.model.{k}.weight": v.detach().to(DTYPES[dtype]).cpu().contiguous() for k, v in state.items()}
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": spec.r,
              "lora_alpha": alpha, "lora_dropout": spec.effective_dropout, "target_modules": list(spec.target_modules),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
              "revision": None}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return config
