"""Backbones: the presets (real transformers classes with the tiny test configs or the exact published
configs of LLaMA-7B/13B and GPT-J-6B, seeded random init, the shipped tiny tokenizers), local
Hugging Face model directories (config + safetensors weights + tokenizer) and Hugging Face model ids
already in the local Hugging Face cache. No network.

A preset's depth can be cut (`num_layers`, the run config's `model.num_layers`) so that a CPU runs one
or two layers of a real width; a model directory is always taken whole."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from . import architectures
from .errors import PeftDsError, read_json
from .tokenizer import TOKENIZER_FILES, TOKENIZER_JSON, TOKENIZER_MODEL, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TINY_TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer.model")
TINY_TOKENIZER_JSON = os.path.join(ASSETS, "tiny_tokenizer.json")  # byte-level BPE, ids 0-2 <|pad|>, bos, eos
TINY_VOCAB = 1024  # the shipped tokenizers' vocabulary (both)
_TOKENIZER_CONFIG = {"model_max_length": 1024, "clean_up_tokenization_spaces": False}
# Presets whose tokenizer is the shipped byte-level BPE as a tokenizer.json (no tokenizer.model), with the
# tokenizer_config.json of the family's own and, where the family's tokenizer.json differs, its fields;
# the other presets use the sentencepiece model.
JSON_TOKENIZERS = {
    # LLaMA-3: PreTrainedTokenizerFast; the post-processor puts <|begin_of_text|> first; no pad token
    # (peft_ds.tokenizer pads with id 0).
    "tiny-llama3": {"config": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                               "eos_token": "<|end_of_text|>", **_TOKENIZER_CONFIG},
                    "tokenizer.json": {}},
    # Qwen2: Qwen2Tokenizer (transformers rebuilds it with Qwen2's pre-tokenizer: single digits), no BOS
    # (a ByteLevel post-processor, as Qwen2's tokenizer.json), eos and pad named.
    "tiny-qwen2": {"config": {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None,
                              "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>", **_TOKENIZER_CONFIG},
                   "tokenizer.json": {"post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                                                         "trim_offsets": False, "use_regex": False}}},
}

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
    # The LLaMA family beyond LLaMA-1, each with what sets it apart from tiny-llama. LLaMA-3: 4:1
    # grouped-query attention (LLaMA-3-8B: 32 heads, 8 KV heads), rope theta 5e5 with LLaMA-3.1's "llama3"
    # rope scaling (wavelengths past original_max_position_embeddings / low_freq_factor stretched by
    # factor), and a tokenizer.json without tokenizer.model (TINY_TOKENIZER_JSON).
    "tiny-llama3": dict(
        model_type="llama", vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    ),
    # Mistral: sliding-window attention (a window of 16 tokens, shorter than the training and generation
    # lengths of the tests, so that it acts), 4:1 GQA; sentencepiece tokenizer as Mistral-7B's.
    "tiny-mistral": dict(
        model_type="mistral", vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    ),
    # Qwen2: biases in q/k/v_proj (drawn, not zero: init_preset_weights), tied embeddings as the small
    # Qwen2 models, 2:1 GQA, rope theta 1e6; byte-level BPE tokenizer.json as Qwen2's.
    "tiny-qwen2": dict(
        model_type="qwen2", vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
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
SUPPORTED_MODEL_TYPES = tuple(architectures.ARCHITECTURES)
# Models whose drawn biases are part of what they are: Qwen2's q/k/v biases (the released ones are far from
# zero), so that an adapter, export or merge that lost a bias would change the outputs.
DRAWN_BIASES = ("qwen2",)


DEPTH_KEYS = {"gptj": "n_layer"}  # others: num_hidden_layers


def preset_fields(name: str, num_layers: int | None = None) -> dict:
    """The config fields of preset `name` (a config.json-like dict), its depth cut to `num_layers`."""
    if name not in PRESETS:
        raise PeftDsError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if num_layers is not None:
        fields[DEPTH_KEYS.get(fields["model_type"], "num_hidden_layers")] = num_layers
    return fields


def preset_config(name: str, num_layers: int | None = None, **overrides):
    from transformers import AutoConfig

    fields = {**preset_fields(name, num_layers), **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


INIT_BLOCK = 1 << 20  # elements drawn per generator: bounds the temporary memory of a huge parameter


def init_preset_weights(model, seed: int = PRESET_SEED) -> None:
    """Seeded init that does not depend on ZeRO-3 or the world size: weights N(0, initializer_range),
    drawn in blocks of rows, each block from its own generator seeded by (seed, name, block); biases 0
    (drawn as weights for the model types in DRAWN_BIASES), norm weights 1. Under ZeRO-3 each rank draws
    only the blocks that overlap its own partition (a flat slice of the parameter) and writes them there:
    no rank gathers or draws the backbone. Persisted parameters (whole on every rank) are drawn whole."""
    std = model.config.initializer_range
    drawn_biases = model.config.model_type in DRAWN_BIASES
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for name, param in model.named_parameters():
            _init_parameter(pool, name, param, seed, std, drawn_biases)


def _init_parameter(pool, name, param, seed, std, drawn_biases):
    shape = tuple(getattr(param, "ds_shape", param.shape))
    is_bias = name.endswith("bias")
    fill = 0.0 if is_bias and not drawn_biases else 1.0 if len(shape) == 1 and not is_bias else None
    partitioned = hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False)
    with contextlib.nullcontext() if partitioned else _gathered(param):
        target = param.ds_tensor if partitioned else param.data
        flat = target.view(-1)
        lo = flat.numel() * torch.distributed.get_rank(param.ds_process_group) if partitioned else 0
        hi = min(lo + flat.numel(), math.prod(shape))
        if hi <= lo:
            return
        if fill is not None:
            flat[:hi - lo].fill_(fill)
        else:
            _draw_seeded_normal(flat, seed, name, shape, std, lo, hi, pool.map)


def _draw_seeded_normal(flat: torch.Tensor, seed: int, name: str, shape: tuple, std: float, lo: int, hi: int,
                        map_):
    """Write elements [lo, hi) of the flattened seeded init of parameter `name` into flat[:hi - lo]: blocks of
    whole rows of at most INIT_BLOCK elements, block b drawn by the generator seeded with (seed, name, b); only
    the blocks that overlap [lo, hi) are drawn. Blocks are independent, so `map_` may draw them on several
    threads (a thread pool's map; torch's normal_ draws on one core): the same values, the temporary memory
    one block per thread."""
    row = max(1, math.prod(shape[1:]))
    block = max(1, INIT_BLOCK // row) * row
    total = math.prod(shape)

    def draw(b):
        start = b * block
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}:{b}".encode()))
        chunk = torch.empty(min(block, total - start)).normal_(0.0, std, generator=g)
        a, z = max(lo, start), min(hi, start + chunk.numel())
        flat[a - lo:z - lo].copy_(chunk[a - start:z - start])

    for _ in map_(draw, range(lo // block, (hi - 1) // block + 1)):
        pass


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

    with _without_transformers_zero3_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        init_preset_weights(model, seed)
    return model


@contextlib.contextmanager
def _without_transformers_zero3_init():
    """Under ZeRO-3, transformers' `_from_config` gathers every module to all ranks to run its own random init
    (`integrations.deepspeed.initialize_weights_zero3`), which `init_preset_weights` then overwrites: over half of
    a real-width build. Skipped while the preset is built; buffers are computed at construction either way."""
    from transformers.integrations import deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original


def build_preset(name: str, seed: int = PRESET_SEED, dtype=torch.float32, num_layers: int | None = None,
                 **overrides):
    return build_from_config(preset_config(name, num_layers, **overrides), seed=seed, dtype=dtype)


def local_model_dir(name_or_path: str) -> str:
    """A model directory as given, or a Hugging Face model id ("org/name") as its snapshot directory in
    the local Hugging Face cache (HF_HOME / HF_HUB_CACHE, `refs/main`), found without any network
    access (compute nodes are offline); one line saying how to download it when it is not there."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    presets = ", ".join(PRESETS)
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except HFValidationError:  # not of the form of a model id: a path
        raise PeftDsError(f"{name_or_path!r} is neither a preset ({presets}) nor a model directory "
                          f"({name_or_path} does not exist)") from None
    except LocalEntryNotFoundError:
        raise PeftDsError(
            f"{name_or_path!r} is neither a preset ({presets}), a model directory, nor a model in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); to use that Hugging Face model, download it on a "
            f"machine with network (a login node) into the cache this job reads: `hf download {name_or_path}` "
            f"(older huggingface_hub: `huggingface-cli download {name_or_path}`)") from None


def read_model_config(model_dir: str) -> dict:
    """The config.json of a model directory or a cached Hugging Face model id, of a supported model_type."""
    model_dir = local_model_dir(model_dir)
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise PeftDsError(f"model directory {model_dir} has no config.json")
    config = read_json(path, "model config")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise PeftDsError(f"{path}: unsupported model_type {config.get('model_type')!r}; supported: "
                          f"{architectures.supported()}")
    return config


# ---- weight files: safetensors (preferred, as transformers prefers them) or PyTorch .bin -------------
# The base models of the papers' era (LLaMA-1 conversions, GPT-J-6B, anything transformers 4.x saved with
# safe_serialization=False) ship only pytorch_model.bin or pytorch_model-0000N-of-0000M.bin shards with an
# index. A .bin shard is unpickled with weights_only=True (no code runs), memory-mapped, one at a time.
WEIGHT_FORMATS = (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                  ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(model_dir: str) -> tuple[str, list[str], str | None]:
    """(format, shard file names, index file name or None) of a model directory's weights."""
    names = set(os.listdir(model_dir))
    for fmt, single, index in WEIGHT_FORMATS:
        if index in names:
            weight_map = read_json(os.path.join(model_dir, index), "weights index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise PeftDsError(f"{os.path.join(model_dir, index)} has no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if s not in names]
            if missing:
                raise PeftDsError(f"model directory {model_dir}: {index} names weight shard {missing[0]}, which "
                                  f"is not there" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return fmt, shards, index
        if single in names:
            return fmt, [single], None
    raise PeftDsError(f"model directory {model_dir} has no weights (model.safetensors[.index.json] or "
                      f"pytorch_model.bin[.index.json])")


def read_bin_shard(path: str, map_location="cpu") -> dict:
    """A .bin weight shard as a state dict (names to tensors), unpickled with weights_only=True and memory-
    mapped where it is in torch's zip format; on map_location "meta" only its header is read. Anything that
    is not a plain state dict is refused in one line."""
    import zipfile

    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # whatever a truncated or foreign file makes the unpickler raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PeftDsError(f"{path} is not a plain state dict that loads with weights_only=True: {reason[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PeftDsError(f"{path} is not a plain state dict (parameter names to tensors): it holds a "
                          f"{type(state).__name__}" + (f" with {type(next(iter(state.values()))).__name__} values"
                                                      if isinstance(state, dict) and state else ""))
    return state


def read_shard(model_dir: str, shard: str) -> tuple[dict, dict]:
    """(tensors on the CPU, safetensors metadata) of one weight shard of either format."""
    path = os.path.join(model_dir, shard)
    if shard.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {"format": "pt"}
    return read_bin_shard(path), {"format": "pt"}


def weight_shapes(model_dir: str) -> dict[str, tuple]:
    """Every weight's shape, from the shards' headers (safetensors) or pickles (a .bin on the meta device):
    no weight is read."""
    _, shards, _ = weight_files(model_dir)
    shapes = {}
    for shard in shards:
        path = os.path.join(model_dir, shard)
        if shard.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in read_bin_shard(path, "meta").items()})
    return shapes


def check_model_dir(model_dir: str) -> dict:
    """Everything about a model directory (or cached model id) that can be wrong, checked before any
    weights are read: its config, its weight files (each .bin shard a plain state dict) and tokenizer."""
    config = read_model_config(model_dir)
    model_dir = local_model_dir(model_dir)
    names = set(os.listdir(model_dir))
    fmt, shards, _ = weight_files(model_dir)
    if fmt == "bin":
        for shard in shards:
            read_bin_shard(os.path.join(model_dir, shard), "meta")
    if not (set(TOKENIZER_FILES) & names):
        raise PeftDsError(f"model directory {model_dir} has no {' or '.join(TOKENIZER_FILES)} (no tokenizer)")
    return config


def load_model_dir(model_dir: str, dtype=torch.float32):
    """A local Hugging Face directory (or cached model id): (model, tokenizer); local files only, no
    remote code."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    model_dir = local_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False
    )
    return model, load_tokenizer(model_dir)


def check_model_source(name_or_dir: str, num_layers: int | None = None) -> str:
    """The model_type of a preset name, a model directory or a cached Hugging Face model id, checked
    before anything is loaded; a depth (`num_layers`) is only for a preset and at least 1."""
    if num_layers is not None and (type(num_layers) is not int or num_layers < 1):
        raise PeftDsError(f"model.num_layers must be an integer >= 1, got {num_layers!r}")
    if name_or_dir in PRESETS:
        return PRESETS[name_or_dir]["model_type"]
    model_dir = local_model_dir(name_or_dir)
    if num_layers is not None:
        raise PeftDsError(f"model.num_layers {num_layers} cuts the depth of a preset ({', '.join(PRESETS)}); "
                          f"{name_or_dir} is a model directory, which is always taken whole")
    return check_model_dir(model_dir)["model_type"]


def write_tokenizer(name: str, out_dir: str) -> None:
    """Preset `name`'s tokenizer files in `out_dir`: tokenizer.model, or tokenizer.json and
    tokenizer_config.json (JSON_TOKENIZERS)."""
    if name not in JSON_TOKENIZERS:
        shutil.copyfile(TINY_TOKENIZER, os.path.join(out_dir, TOKENIZER_MODEL))
        return
    with open(TINY_TOKENIZER_JSON, encoding="utf-8") as f:
        tokenizer = {**json.load(f), **JSON_TOKENIZERS[name]["tokenizer.json"]}
    with open(os.path.join(out_dir, TOKENIZER_JSON), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(JSON_TOKENIZERS[name]["config"], f, indent=2)


def load_tokenizer_for(name_or_dir: str):
    if name_or_dir in JSON_TOKENIZERS:
        # read as from the preset's directory: AutoTokenizer picks the class from both configs
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(name_or_dir, tmp)
            preset_config(name_or_dir).to_json_file(os.path.join(tmp, "config.json"))
            return load_tokenizer(tmp)
    if name_or_dir in PRESETS:
        from .tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(TINY_TOKENIZER)
    check_model_source(name_or_dir)
    return load_tokenizer(local_model_dir(name_or_dir))


def _auto_config(name_or_dir: str, num_layers: int | None = None):
    """The transformers config of a preset (its depth cut to `num_layers`) or of a model directory or
    cached model id (local files only, no remote code)."""
    if name_or_dir in PRESETS:
        return preset_config(name_or_dir, num_layers)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(local_model_dir(name_or_dir), local_files_only=True, trust_remote_code=False)


def hidden_size_of(name_or_dir: str) -> int:
    config = _auto_config(name_or_dir)
    return getattr(config, "hidden_size", None) or config.n_embd


def build_skeleton(name_or_dir: str, num_layers: int | None = None):
    """The backbone's real class and shapes on the meta device: no weights, no memory. The training
    checks inject adapters into it before any rank starts, so every targeting rule is checked by the
    code that injects. The class is called directly: from_config would partition it with zero.Init
    while a ZeRO-3 HfDeepSpeedConfig is alive in this process."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _auto_config(name_or_dir, num_layers)
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


def build_model(name_or_dir: str, dtype=torch.float32, ds_config: dict | None = None, num_layers: int | None = None,
                device=None):
    """The backbone for training. With a ZeRO-3 `ds_config` the HfDeepSpeedConfig exists before the
    model is built or loaded, so each rank materialises only its partition; it is kept alive on the
    model (`model.hf_deepspeed_config`) as transformers requires, and the build runs under
    `zero3_build_memory`. Without ZeRO, `device` (a GPU) receives the whole model: a model directory's
    weights are loaded onto it shard by shard, a preset is built on the CPU and moved."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep, memory = None, contextlib.nullcontext()
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        memory = zero3_build_memory()
        keep = HfDeepSpeedConfig(ds_config)
    with memory:
        placed = {} if keep is not None or device is None or torch.device(device).type == "cpu" else {
            "device_map": {"": str(device)}}
        if name_or_dir in PRESETS:
            model = build_from_config(preset_config(name_or_dir, num_layers), dtype=dtype)
            if placed:
                model = model.to(device)
        else:
            check_model_source(name_or_dir, num_layers)
            model = AutoModelForCausalLM.from_pretrained(
                local_model_dir(name_or_dir), dtype=dtype, local_files_only=True, trust_remote_code=False, **placed
            )
    model.hf_deepspeed_config = keep
    return model


def load_model(name_or_dir: str, dtype=torch.float32, num_layers: int | None = None):
    """A preset name (its depth cut to `num_layers`), a local model directory or a cached Hugging Face
    model id: (model, tokenizer)."""
    check_model_source(name_or_dir, num_layers)
    if name_or_dir in PRESETS:
        return build_preset(name_or_dir, dtype=dtype, num_layers=num_layers), load_tokenizer_for(name_or_dir)
    return load_model_dir(name_or_dir, dtype=dtype)


def write_preset(name: str, out_dir: str, force: bool = False, num_layers: int | None = None) -> str:
    """Write a preset (its depth cut to `num_layers`) as a local HF model directory: config.json,
    model.safetensors, and its tokenizer: tokenizer.model, or tokenizer.json + tokenizer_config.json.
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
        write_tokenizer(name, staging)
    return out_dir
