"""What the benchmarks share: tiny-llama enlarged until a step takes well over 100 ms on the CPU."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def enlarged_llama_config(hidden: int, layers: int):
    """tiny-llama's classes and tokenizer, `hidden` wide (64-dim heads, intermediate ~8/3 hidden)."""
    from peft_ds.models import preset_config

    return preset_config("tiny-llama", hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
