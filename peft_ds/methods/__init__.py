"""One file per method; pure PyTorch (no DeepSpeed import)."""

from .adamix import AdamixAdapterLinear, AdamixLoraLinear, Router
from .adapter import AdapterLinear
from .bilora import BiLoraLinear
from .lora import LoraLinear
from .sibo import InitialResidual

# Names of every adapter parameter, as they end a state-dict key (an index follows for expert lists).
ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B", "adapter_down", "adapter_up", "sibo_theta", "bilora_P", "bilora_E",
                           "bilora_Q")
PEFT_LAYERS = (LoraLinear, AdapterLinear, BiLoraLinear)  # the AdaMix mixtures are subclasses


def method_name(module) -> str:
    return {AdamixLoraLinear: "adamix_lora", AdamixAdapterLinear: "adamix_adapter",
            LoraLinear: "lora", AdapterLinear: "adapter", BiLoraLinear: "bilora"}[type(module)]

__all__ = ["AdapterLinear", "LoraLinear", "AdamixLoraLinear", "AdamixAdapterLinear", "BiLoraLinear", "InitialResidual",
           "Router",
           "ADAPTER_PARAMETER_NAMES", "PEFT_LAYERS", "method_name"]
