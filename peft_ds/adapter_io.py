"""The native adapter directory: `adapter.safetensors` (keys as in `peft_ds.injection`) and
`adapter_config.json` (format, peft-ds version, PeftSpec, base model). Safetensors only: no pickles."""

from __future__ import annotations

import json
import os

from .errors import PeftDsError, read_json
from .injection import adapter_state_dict, apply_peft, load_adapter_state_dict
from .spec import PeftSpec
from .version import __version__

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "peft-ds-adapter"


def model_signature(model) -> dict:
    config = model.config
    return {"model_type": config.model_type,
            "hidden_size": getattr(config, "hidden_size", None) or config.n_embd,
            "num_hidden_layers": config.num_hidden_layers}


def save_adapter(model, out_dir: str, base_model: str | None = None, extra: dict | None = None,
                 state: dict | None = None) -> str:
    """Write `state` (default: the model's adapter state dict) as a native adapter directory."""
    from safetensors.torch import save_file

    state = adapter_state_dict(model) if state is None else state
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    config = {"format": FORMAT, "peft_ds_version": __version__, "method": model.peft_spec.method,
              "peft_spec": model.peft_spec.to_dict(), "base_model": base_model, "base": model_signature(model),
              **(extra or {})}
    save_file(state, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
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


def load_adapter(model, adapter_dir: str):
    """Apply the saved PeftSpec to a fresh backbone and load the adapter weights (SIBO h0 path kept)."""
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    expected, actual = config["base"], model_signature(model)
    if expected != actual:
        raise PeftDsError(f"adapter {adapter_dir} was trained on {expected}, the base model is {actual}")
    apply_peft(model, PeftSpec.from_dict(config["peft_spec"]))
    load_adapter_state_dict(model, load_file(os.path.join(adapter_dir, WEIGHTS)))
    return model
