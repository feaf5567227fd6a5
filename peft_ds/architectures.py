"""Where things live in each supported backbone, and the per-architecture defaults of SPEC 2.1-2.3."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import PeftDsError


@dataclass(frozen=True)
class Architecture:
    name: str
    embedding: str  # dotted path of the token embedding whose output is SIBO's h0
    base_model: str  # the inner model that calls the embedding and the decoder layers
    layers: str  # dotted path of the decoder-layer ModuleList
    lora_targets: tuple[str, ...]  # SPEC 2.1
    adapter_targets: tuple[str, ...]  # SPEC 2.2
    output_side: tuple[str, ...]  # adapter placed after the frozen linear (LLM-Adapters output_adapter)
    sibo_sites: dict  # method -> default sites, SPEC 2.3
    adamix_adapter_targets: tuple[str, ...]  # SPEC 2.4: the FFN output


# LLaMA's layout, shared by the families that keep its module names and places (model.embed_tokens,
# q/k/v/o_proj, gate/up/down_proj): LLaMA-1/2/3, Mistral, Qwen2. What differs between them lies inside
# the modules an adapter wraps whole, so the targets and SIBO's sites are LLaMA's: grouped-query
# attention (k/v_proj narrower than q_proj: every adapter takes its shapes from the wrapped linear),
# Qwen2's q/k/v biases (kept in the frozen linear, untouched by a merge), rope scaling and Mistral's
# sliding window (attention only; SIBO's h0 enters the MLP).
LLAMA = Architecture(
    name="llama",
    embedding="model.embed_tokens",
    base_model="model",
    layers="model.layers",
    lora_targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    adapter_targets=("gate_proj", "up_proj"),
    output_side=("down_proj", "o_proj"),
    # AdaMix: LoRA's sites; the adapter mixture on the FFN output blends its (hidden-sized) input.
    sibo_sites={"lora": ("up_proj",), "adapter": ("gate_proj", "up_proj"), "adamix_lora": ("up_proj",),
                "adamix_adapter": ("down_proj",), "bilora": ("up_proj",)},
    adamix_adapter_targets=("down_proj",),
)

# model_type -> layout; CAUSAL_LM names each model_type's class for messages.
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gptj": Architecture(
        name="gptj",
        embedding="transformer.wte",
        base_model="transformer",
        layers="transformer.h",
        lora_targets=("q_proj", "k_proj", "v_proj", "fc_in", "fc_out"),
        adapter_targets=("fc_out",),
        output_side=("fc_out", "out_proj"),
        # Official GPT-J Adapter-SIBO blends the whole MLP input (fc_in's frozen path too).
        sibo_sites={"lora": ("fc_in",), "adapter": ("mlp",), "adamix_lora": ("fc_in",), "adamix_adapter": ("fc_out",),
                    "bilora": ("fc_in",)},
        adamix_adapter_targets=("fc_out",),
    ),
}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "gptj": "GPTJForCausalLM"}

# Sites that are not adapted modules: their whole input is blended (official GPT-J Adapter-SIBO).
WHOLE_INPUT_SITES = ("mlp",)


def supported() -> str:
    """The supported model_types and their classes, for error messages."""
    return ", ".join(f"{t} ({c})" for t, c in CAUSAL_LM.items())


def detect(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PeftDsError(f"unsupported architecture {model_type!r} ({type(model).__name__}); supported: {supported()}")
    return ARCHITECTURES[model_type]


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.n_embd


def default_targets(arch: Architecture, method: str) -> tuple[str, ...]:
    return {"adapter": arch.adapter_targets, "adamix_adapter": arch.adamix_adapter_targets}.get(method, arch.lora_targets)


def matches(relative_name: str, names) -> bool:
    """PEFT's rule: a module matches a name if its dotted path equals it or ends with '.' + name."""
    return any(relative_name == n or relative_name.endswith("." + n) for n in names)
