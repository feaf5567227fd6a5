"""Backbones: the presets (real transformers classes with the tiny test configs or the exact published
configs of LLaMA-7B/13B and GPT-J-6B, seeded random init, the shipped tiny tokenizer) and local
Hugging Face model directories (config + safetensors weights + tokenizer). No network.

A preset's depth can be cut (`num_layers`, the run config's `model.num_layers`) so that a CPU runs one
or two layers of a real width; a model directory is always taken whole."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import zlib

import torch

from .errors import PeftDsError, read_json
from .tokenizer import TOKENIZER_MODEL, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TINY_TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer.model")
TINY_VOCAB = 1024  # the shipped sentencepiece model's vocabulary

PRESETS = {
    "tiny-llama": dict(
        model_type="llama", vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    ),
    "tiny-gptj": dict(
        model_type="gptj", vocab_size=TINY_VOCAB, n_embd=128, n_layer=4, n_head=4, rotary_dim=16,
        n_positions=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    ),
    # The published config.json of each model (huggyllama/llama-7b and llama-13b, as LLM-Adapters' yahma
    # copies; EleutherAI/gpt-j-6b): every field that shapes the computation. Weights are random (seeded);
    # the tokenizer is the shipped tiny one, whose ids all fall inside these vocabularies.
    "llama-7b-shape": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
        hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "llama-13b-shape": dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=2048, rms_norm_eps=1e-6,
        hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "gptj-6b-shape": dict(
        model_type="gptj", vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=None,
        n_positions=2048, activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False,
    ),
}
PRESET_SEED = 0
SUPPORTED_MODEL_TYPES = ("llama", "gptj")


DEPTH_KEYS = {"llama": "num_hidden_layers", "gptj": "n_layer"}


def preset_fields(name: str, num_layers: int | None = None) -> dict:
    """The config fields of preset `name` (a config.json-like dict), its depth cut to `num_layers`."""
    if name not in PRESETS:
        raise PeftDsError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if num_layers is not None:
        fields[DEPTH_KEYS[fields["model_type"]]] = num_layers
    return fields


def preset_config(name: str, num_layers: int | None = None, **overrides):
    from transformers import GPTJConfig, LlamaConfig

    fields = {**preset_fields(name, num_layers), **overrides}
    model_type = fields.pop("model_type")
    return (LlamaConfig if model_type == "llama" else GPTJConfig)(**fields)


INIT_BLOCK = 1 << 20  # elements drawn per generator: bounds the temporary memory of a huge parameter


def init_preset_weights(model, seed: int = PRESET_SEED) -> None:
    """Seeded init that does not depend on ZeRO-3 or the world size: weights N(0, initializer_range),
    drawn in blocks of rows, each block from its own generator seeded by (seed, name, block); biases 0,
    norm weights 1. Under ZeRO-3 one parameter is gathered at a time, so no rank holds the backbone."""
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        with _gathered(param):
            if name.endswith("bias"):
                param.data.zero_()
            elif len(shape) == 1:
                param.data.fill_(1.0)
            else:
                rows = max(1, INIT_BLOCK // max(1, math.prod(shape[1:])))
                for block, start in enumerate(range(0, shape[0], rows)):
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}:{block}".encode()))
                    chunk = torch.empty((min(rows, shape[0] - start), *shape[1:])).normal_(0.0, std, generator=g)
                    param.data[start:start + rows].copy_(chunk.to(param.dtype))


@contextlib.contextmanager
def _gathered(param):
    if not hasattr(param, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        yield


def build_from_config(config, seed: int = PRESET_SEED, dtype=torch.float32):
    """The real transformers class for `config`, with the preset's seeded init (partitioned when a
    ZeRO-3 HfDeepSpeedConfig is alive)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        init_preset_weights(model, seed)
    return model


def build_preset(name: str, seed: int = PRESET_SEED, dtype=torch.float32, num_layers: int | None = None,
                 **overrides):
    return build_from_config(preset_config(name, num_layers, **overrides), seed=seed, dtype=dtype)


def read_model_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise PeftDsError(f"model directory {model_dir} does not exist")
    if not os.path.isfile(path):
        raise PeftDsError(f"model directory {model_dir} has no config.json")
    config = read_json(path, "model config")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise PeftDsError(
            f"{path}: unsupported model_type {config.get('model_type')!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def check_model_dir(model_dir: str) -> dict:
    """Everything about a model directory that can be wrong, checked before any weights are read."""
    config = read_model_config(model_dir)
    names = set(os.listdir(model_dir))
    if not ({"model.safetensors", "model.safetensors.index.json"} & names):
        raise PeftDsError(f"model directory {model_dir} has no safetensors weights (model.safetensors[.index.json])")
    if config["model_type"] == "llama" and TOKENIZER_MODEL not in names:
        raise PeftDsError(f"model directory {model_dir} has no {TOKENIZER_MODEL}")
    if config["model_type"] != "llama" and not ({TOKENIZER_MODEL, "tokenizer.json"} & names):
        raise PeftDsError(f"model directory {model_dir} has no tokenizer ({TOKENIZER_MODEL} or tokenizer.json)")
    return config


def load_model_dir(model_dir: str, dtype=torch.float32):
    """A local Hugging Face directory: (model, tokenizer); local files only, no remote code."""
    from transformers import AutoModelForCausalLM

    config = check_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False
    )
    return model, load_tokenizer(model_dir, config["model_type"])


def check_model_source(name_or_dir: str, num_layers: int | None = None) -> str:
    """The model_type of a preset name or a model directory, checked before anything is loaded; a
    depth (`num_layers`) is only for a preset and at least 1."""
    if num_layers is not None and (type(num_layers) is not int or num_layers < 1):
        raise PeftDsError(f"model.num_layers must be an integer >= 1, got {num_layers!r}")
    if name_or_dir in PRESETS:
        return PRESETS[name_or_dir]["model_type"]
    if num_layers is not None and os.path.isdir(name_or_dir):
        raise PeftDsError(f"model.num_layers {num_layers} cuts the depth of a preset ({', '.join(PRESETS)}); "
                          f"{name_or_dir} is a model directory, which is always taken whole")
    if not os.path.isdir(name_or_dir):
        raise PeftDsError(f"{name_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    return check_model_dir(name_or_dir)["model_type"]


def load_tokenizer_for(name_or_dir: str):
    if name_or_dir in PRESETS:
        from .tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(TINY_TOKENIZER)
    return load_tokenizer(name_or_dir, check_model_source(name_or_dir))


def hidden_size_of(name_or_dir: str) -> int:
    config = preset_config(name_or_dir) if name_or_dir in PRESETS else None
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_dir, local_files_only=True, trust_remote_code=False)
    return getattr(config, "hidden_size", None) or config.n_embd


def build_skeleton(name_or_dir: str, num_layers: int | None = None):
    """The backbone's real class and shapes on the meta device: no weights, no memory. The training
    checks inject adapters into it before any rank starts, so every targeting rule is checked by the
    code that injects. The class is called directly: from_config would partition it with zero.Init
    while a ZeRO-3 HfDeepSpeedConfig is alive in this process."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = preset_config(name_or_dir, num_layers) if name_or_dir in PRESETS else None
    if config is None:
        config = AutoConfig.from_pretrained(name_or_dir, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def _glibc():
    """The C library through ctypes when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "glibc"):
        return ctypes.CDLL(name)
    return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
BUILD_MMAP_THRESHOLD = 1 << 20
# After the build: glibc's own ceiling for its dynamic threshold; buffers below it are reused from the
# heap, and freed heap memory is kept for the next step up to the trim threshold.
STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD = 32 << 20, 1 << 30


def return_freed_memory_to_os() -> None:
    """Serve allocations of 1 MiB and more from mmap, so memory freed after partitioning goes back to
    the OS. glibc's dynamic threshold otherwise climbs to 32 MiB after the first large free, and the
    full-size staging tensors of zero.Init then stay resident: a 1B backbone measured 2x its
    partition per rank (bench/zero3_memory.py). For the build only (`zero3_build_memory`): kept for a
    training run, every activation and gradient buffer of a MiB or more is a fresh mmap, page-faulted
    on every step (bench/vs_trainer.py: 1.5x the step time of the Trainer stack)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, BUILD_MMAP_THRESHOLD)


def keep_freed_memory_for_reuse() -> None:
    """The steady state after a ZeRO-3 build: buffers below 32 MiB come from the heap and are reused
    step after step, freed heap memory is not trimmed back below 1 GiB on every free (both fixed, so
    glibc's dynamic threshold cannot drift), and what the build freed goes back to the OS now
    (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def zero3_build_memory():
    """While a ZeRO-3 backbone is built or loaded: `return_freed_memory_to_os`; afterwards
    `keep_freed_memory_for_reuse`."""
    return_freed_memory_to_os()
    try:
        yield
    finally:
        keep_freed_memory_for_reuse()


def build_model(name_or_dir: str, dtype=torch.float32, ds_config: dict | None = None, num_layers: int | None = None):
    """The backbone for training. With a ZeRO-3 `ds_config` the HfDeepSpeedConfig exists before the
    model is built or loaded, so each rank materialises only its partition; it is kept alive on the
    model (`model.hf_deepspeed_config`) as transformers requires, and the build runs under
    `zero3_build_memory`."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep, memory = None, contextlib.nullcontext()
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        memory = zero3_build_memory()
        keep = HfDeepSpeedConfig(ds_config)
    with memory:
        if name_or_dir in PRESETS:
            model = build_from_config(preset_config(name_or_dir, num_layers), dtype=dtype)
        else:
            check_model_source(name_or_dir, num_layers)
            check_model_dir(name_or_dir)
            model = AutoModelForCausalLM.from_pretrained(
                name_or_dir, dtype=dtype, local_files_only=True, trust_remote_code=False
            )
    model.hf_deepspeed_config = keep
    return model


def load_model(name_or_dir: str, dtype=torch.float32, num_layers: int | None = None):
    """A preset name (its depth cut to `num_layers`) or a local model directory: (model, tokenizer)."""
    check_model_source(name_or_dir, num_layers)
    if name_or_dir in PRESETS:
        return build_preset(name_or_dir, dtype=dtype, num_layers=num_layers), load_tokenizer_for(name_or_dir)
    return load_model_dir(name_or_dir, dtype=dtype)


def write_preset(name: str, out_dir: str, force: bool = False, num_layers: int | None = None) -> str:
    """Write a preset (its depth cut to `num_layers`) as a local HF model directory: config.json,
    model.safetensors, tokenizer.model.
    Built beside `out_dir` and moved in (with `force`, into a non-empty directory file by file, each
    file replaced by a rename, never written through a symlink); modes follow the umask."""
    from . import outputs

    preset_fields(name)  # an unknown name is refused first
    check_model_source(name, num_layers)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not force:
        raise PeftDsError(f"{out_dir} exists and is not empty (use --force to overwrite)")
    model = build_preset(name, num_layers=num_layers)
    with outputs.replace_dir(out_dir, merge=True) as staging:
        model.save_pretrained(staging)
        shutil.copyfile(TINY_TOKENIZER, os.path.join(staging, TOKENIZER_MODEL))
    return out_dir
