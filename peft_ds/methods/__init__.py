"""One file per method; pure PyTorch (no DeepSpeed import)."""

from .adapter import AdapterLinear
from .lora import LoraLinear
from .sibo import InitialResidual

# Names of every adapter parameter, as they end a state-dict key (an index follows for expert lists).
ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B", "adapter_down", "adapter_up", "sibo_theta")
PEFT_LAYERS = (LoraLinear, AdapterLinear)

__all__ = ["AdapterLinear", "LoraLinear", "InitialResidual", "ADAPTER_PARAMETER_NAMES", "PEFT_LAYERS"]
