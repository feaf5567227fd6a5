"""One file per method; pure PyTorch (no DeepSpeed import)."""

from .adamix import AdamixAdapterLinear, AdamixLoraLinear, Router
from .adapter import AdapterLinear
from .bilora import BiLoraLinear
from .lora import LoraLinear
from .sibo import InitialResidual

# The parameters of each method, as they end a state-dict key (an expert index follows in a mixture),
# and the axis of each that has the method's width (r, or the adapter's bottleneck).
METHOD_PARAMETERS = {"lora": ("lora_A", "lora_B"), "adamix_lora": ("lora_A", "lora_B"),
                     "adapter": ("adapter_down", "adapter_up"), "adamix_adapter": ("adapter_down", "adapter_up"),
                     "bilora": ("bilora_P", "bilora_E", "bilora_Q")}
WIDTH_AXIS = {"lora_A": 0, "lora_B": 1, "adapter_down": 0, "adapter_up": 1, "bilora_P": 1, "bilora_E": 0,
              "bilora_Q": 0}
SIBO_PARAMETER = "sibo_theta"  # learnable SIBO: one per decoder layer
ADAPTER_PARAMETER_NAMES = tuple(WIDTH_AXIS) + (SIBO_PARAMETER,)
PEFT_LAYERS = (LoraLinear, AdapterLinear, BiLoraLinear)  # the AdaMix mixtures are subclasses


def method_name(module) -> str:
    return {AdamixLoraLinear: "adamix_lora", AdamixAdapterLinear: "adamix_adapter",
            LoraLinear: "lora", AdapterLinear: "adapter", BiLoraLinear: "bilora"}[type(module)]

__all__ = ["AdapterLinear", "LoraLinear", "AdamixLoraLinear", "AdamixAdapterLinear", "BiLoraLinear", "InitialResidual",
           "Router",
           "ADAPTER_PARAMETER_NAMES", "METHOD_PARAMETERS", "WIDTH_AXIS", "SIBO_PARAMETER", "PEFT_LAYERS",
           "method_name"]
