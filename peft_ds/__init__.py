"""peft-ds: parameter-efficient adapters (LoRA, bottleneck adapter, SIBO, AdaMix, BiLoRA) on frozen
LLaMA / GPT-J backbones under DeepSpeed ZeRO-3."""

from .adapter_io import load_adapter, save_adapter
from .distributed import cpu_accelerator_without_cuda, op_cache_per_environment
from .errors import PeftDsError
from .injection import adapter_state_dict, apply_peft, load_adapter_state_dict, trainable_report
from .spec import PeftSpec
from .version import __version__

op_cache_per_environment()  # before anything builds a DeepSpeed op
cpu_accelerator_without_cuda()  # before anything imports DeepSpeed

__all__ = [
    "PeftDsError", "PeftSpec", "apply_peft", "load_adapter", "save_adapter", "adapter_state_dict", "load_adapter_state_dict",
    "trainable_report", "__version__",
]
