"""`peft-ds consolidate` (SPEC 4): a ZeRO-3 checkpoint of any world size -> one adapter.

Per rank it reads the `param_shapes` of the model-states file and the `fp32_flat_groups` of the
optimizer-states file, both memory-mapped and unpickled with `weights_only=True` (the Adam moments and
any frozen backbone fragments stay on disk, unread). Each adapter tensor is stitched as DeepSpeed lays
it out: padded to a multiple of the world size ws, rank r holding elements [r p, (r + 1) p) with
p = ceil(n / ws), the parameters back to back in each rank's flat groups (in `param_shapes` order,
sub-groups concatenated). Outputs: the native adapter, the Hugging Face PEFT adapter, or a base model
directory with the LoRA delta merged into a copy of its weights, streamed one shard at a time.
Every check runs before anything is written (the output never overlaps the checkpoint it reads, or the
base model it merges into, and its directory takes a new file); the output is built in a hidden
sibling and swapped in when complete (`peft_ds.outputs`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import adapter_io, architectures, checkpoint, outputs
from .ds_config import DTYPES
from .errors import PeftDsError, read_json
from .methods import METHOD_PARAMETERS, SIBO_PARAMETER, WIDTH_AXIS
from .spec import ADAPTER_FAMILY, PeftSpec
from .version import __version__

FORMATS = ("native", "peft")


class _Opaque:
    """A DeepSpeed object inside a checkpoint (a loss scaler), kept as its attribute dict."""

    def __init__(self, *args):
        self.args = args


def _enum_value(value):
    return value


# The non-tensor globals of a ZeRO-3 optimizer-states file, mapped to harmless stand-ins so the files
# unpickle with weights_only=True and without importing DeepSpeed.
_SAFE_GLOBALS = [(_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
                 (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
                 (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")]


def _load(path: str) -> dict:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()
        reason = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise PeftDsError(f"cannot read {path}: {reason.strip()}") from None


@dataclass
class ZeroCheckpoint:
    tag_dir: str
    tag: str
    meta: dict
    spec: PeftSpec  # as trained (resolved targets)
    world_size: int
    shapes: "OrderedDict[str, torch.Size]"  # every adapter parameter, in DeepSpeed's flat order
    flat: list  # per rank: its fp32 flat groups (memory-mapped)
    frozen_fragments: bool  # the model-states files carry the frozen backbone's shards (left unread)


def resolve_root(path: str) -> tuple[str, str | None]:
    """(checkpoints root, tag named by the path) for a run directory, its `checkpoints/`, or a tag directory."""
    if not os.path.isdir(path):
        raise PeftDsError(f"checkpoint directory {path} does not exist")
    if os.path.isfile(os.path.join(path, checkpoint.META)):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def _spec_of(meta: dict, where: str) -> PeftSpec:
    if "peft_spec" in meta:
        return PeftSpec.from_dict(meta["peft_spec"]).validate()
    if "config" not in meta or "method" not in meta["config"]:
        raise PeftDsError(f"{where}: the checkpoint meta has neither peft_spec nor config.method")
    from . import models

    spec = PeftSpec.from_dict(meta["config"]["method"]).validate()
    if spec.target_modules is None:  # written before metas carried the resolved spec
        model_type = models.check_model_source(meta["config"]["model"]["name_or_path"])
        arch = architectures.ARCHITECTURES[model_type]
        spec = dataclasses.replace(spec, target_modules=list(architectures.default_targets(arch, spec.method)))
    return spec


def _split(name: str) -> tuple[str, str, int | None]:
    """(module path, parameter kind, expert index or None) of an adapter key, e.g.
    `model.layers.0.mlp.up_proj.lora_A.2` -> (`model.layers.0.mlp.up_proj`, `lora_A`, 2)."""
    stem, _, last = name.rpartition(".")
    if not last.isdigit():
        return stem, last, None
    module, _, kind = stem.rpartition(".")
    return module, kind, int(last)


def _checkpoint_method(names) -> str:
    """The method whose parameters a checkpoint holds (AdaMix: expert-indexed names)."""
    parts = [_split(name) for name in names]
    kinds = {kind for _, kind, _ in parts}
    indexed = any(index is not None for _, _, index in parts)
    kinds.discard(SIBO_PARAMETER)
    for method, params in METHOD_PARAMETERS.items():
        if kinds and kinds <= set(params) and indexed == method.startswith("adamix"):
            return method
    return "+".join(sorted(kinds)) or "none"


def _check_against_spec(shapes: dict, spec: PeftSpec, where: str) -> None:
    """The parameters are those of the config's method, at its width, on its targets."""
    found = _checkpoint_method(shapes)
    plain = spec.method.removeprefix("adamix_")
    if found != spec.method and not (found == plain and spec.num_experts == 1):
        raise PeftDsError(f"{where} holds {found} parameters, but its config says method {spec.method}")
    width = spec.bottleneck_size if spec.method in ADAPTER_FAMILY else spec.r
    experts = {}
    for name, shape in shapes.items():
        stem, last, index = _split(name)
        if index is not None:
            experts[f"{stem}.{last}"] = max(experts.get(f"{stem}.{last}", 0), index + 1)
        if last == SIBO_PARAMETER:
            if not spec.sibo_learnable:
                raise PeftDsError(f"{where} holds a learnable SIBO lambda ({name}), but its config has "
                                  f"sibo_learnable false")
            continue
        if not architectures.matches(stem, spec.target_modules):
            raise PeftDsError(f"{where}: tensor {name} adapts a module not among the config's target_modules "
                              f"({', '.join(spec.target_modules)})")
        axis = WIDTH_AXIS[last]
        if len(shape) <= axis or shape[axis] != width:
            raise PeftDsError(f"{where}: tensor {name} has shape {tuple(shape)}, but the config's "
                              f"{'bottleneck_size' if spec.method in ADAPTER_FAMILY else 'r'} is {width}")
    for stem, count in experts.items():
        if count != spec.num_experts:
            raise PeftDsError(f"{where}: {stem} has {count} experts, the config says num_experts {spec.num_experts}")


def open_checkpoint(path: str, tag: str | None = None) -> ZeroCheckpoint:
    """Every rank file of the tag read (memory-mapped) and checked against the others and the meta."""
    root, named = resolve_root(path)
    if tag is not None and named is not None and tag != named:
        raise PeftDsError(f"{path} is the checkpoint {named}, but --tag asks for {tag}")
    tag, meta = checkpoint.find_checkpoint(root, tag or named)
    tag_dir = os.path.join(root, tag)
    if meta.get("zero_stage") != 3:
        raise PeftDsError(f"{tag_dir} is a ZeRO-{meta.get('zero_stage')} checkpoint; consolidate reads ZeRO-3 "
                          f"checkpoints (other stages hold the adapter unpartitioned)")
    ws = meta["world_size"]
    files = checkpoint.rank_files(tag_dir, ws)
    model_files, optim_files = files[:ws], files[ws:]
    shapes, flat, frozen = None, [], False
    for rank, (model_file, optim_file) in enumerate(zip(model_files, optim_files)):
        states = _load(model_file)
        name = os.path.basename(model_file)
        if states.get("dp_world_size", ws) != ws:
            raise PeftDsError(f"{tag_dir}: {name} was written by a run of {states['dp_world_size']} ranks, the "
                              f"checkpoint meta says {ws}")
        if "step" in states and states["step"] != meta.get("step", states["step"]):
            raise PeftDsError(f"{tag_dir}: {name} belongs to step {states['step']}, the checkpoint is step "
                              f"{meta['step']} (rank files of different saves are mixed)")
        rank_shapes = OrderedDict((k, torch.Size(v)) for group in states["param_shapes"] for k, v in group.items())
        if shapes is None:
            shapes = rank_shapes
        elif rank_shapes != shapes:
            raise PeftDsError(f"{tag_dir}: {name} lists other parameters or shapes than rank 0 (rank files of "
                              f"different runs are mixed)")
        frozen = frozen or bool(states.get("frozen_param_fragments"))
        optim = _load(optim_file).get("optimizer_state_dict", {})
        if optim.get("partition_count", ws) != ws:
            raise PeftDsError(f"{tag_dir}: {os.path.basename(optim_file)} is a partition of {optim['partition_count']} "
                              f"ranks, the checkpoint meta says {ws}")
        if "fp32_flat_groups" not in optim:
            raise PeftDsError(f"{tag_dir}: {os.path.basename(optim_file)} has no fp32 partitions (not a ZeRO-3 "
                              f"optimizer state)")
        groups = list(optim["fp32_flat_groups"])
        expected = sum(math.ceil(math.prod(s) / ws) for s in shapes.values())
        held = sum(g.numel() for g in groups)
        if held != expected:
            raise PeftDsError(f"{tag_dir}: rank {rank} holds {held} fp32 elements, the parameter shapes need "
                              f"{expected} at world size {ws} (world-size or shape mismatch)")
        flat.append(groups)
    spec = _spec_of(meta, tag_dir)
    for said in (meta.get("method"), meta.get("config", {}).get("method", {}).get("method")):
        if said not in (None, spec.method):
            raise PeftDsError(f"{tag_dir}: the checkpoint meta names method {said} and {spec.method}")
    _check_against_spec(shapes, spec, tag_dir)
    return ZeroCheckpoint(tag_dir, tag, meta, spec, ws, shapes, flat, frozen)


def _stitch(groups: list, offset: int, count: int) -> torch.Tensor:
    """Elements [offset, offset + count) of one rank's flat groups taken as one vector."""
    parts, start = [], 0
    for group in groups:
        end = start + group.numel()
        if offset < end and offset + count > start:
            parts.append(group[max(offset, start) - start:min(offset + count, end) - start])
        start = end
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def tensors(ckpt: ZeroCheckpoint):
    """(name, full fp32 tensor) of every adapter parameter, one at a time, in the checkpoint's order."""
    offset = 0
    for name, shape in ckpt.shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / ckpt.world_size)
        full = torch.cat([_stitch(groups, offset, part) for groups in ckpt.flat])
        yield name, full[:numel].view(shape).clone()
        offset += part


def read_state(path: str, tag: str | None = None) -> "OrderedDict[str, torch.Tensor]":
    """The fp32 adapter state dict of a ZeRO-3 checkpoint, as trained (no merge, no fold)."""
    return OrderedDict(tensors(open_checkpoint(path, tag)))


# ---- the command ---------------------------------------------------------------------------------


@dataclass
class Plan:
    fmt: str
    merge_into_base: str | None
    dtype: str
    keep_experts: bool
    fold: bool


def _transform(state: dict, spec: PeftSpec, plan: Plan) -> tuple[dict, PeftSpec, list[str]]:
    """AdaMix experts averaged unless kept; BiLoRA folded on request (and for PEFT or a merge)."""
    from .methods import adamix, bilora

    notes = []
    if spec.method.startswith("adamix") and not plan.keep_experts:
        state, spec = adamix.merge_state(state), adamix.merged_spec(spec)
        notes.append("AdaMix experts averaged")
    if spec.method == "bilora" and (plan.fold or plan.fmt == "peft" or plan.merge_into_base):
        state, spec = bilora.fold_state(state, spec.singular_values), bilora.folded_spec(spec)
        notes.append("BiLoRA folded into LoRA")
    return state, spec, notes


def _merged_name(shard: str) -> str:
    """The safetensors file a base weight shard is merged into: its own name, or a .bin shard's as
    transformers names safetensors shards (pytorch_model-00001-of-00003.bin -> model-00001-of-00003.safetensors)."""
    if shard.endswith(".safetensors"):
        return shard
    return shard.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"


def _check_merge(ckpt: ZeroCheckpoint, spec: PeftSpec, base_dir: str) -> None:
    """The merge is defined (a LoRA delta, no SIBO) and every target weight is in the base, of the
    adapter's shape; read from the weight files' headers only (safetensors or .bin)."""
    from .models import check_model_dir, weight_shapes

    if spec.method != "lora":
        raise PeftDsError(f"--merge-into-base needs a LoRA-family adapter; {spec.method} is not a linear delta of the "
                          f"base weights (use --format native and peft_ds.load_adapter)")
    if spec.sibo:
        raise PeftDsError("--merge-into-base: LoRA-SIBO cannot be merged into W (its lambda s B A h0 term needs h0, "
                          "SPEC 2.3); use --format native and peft_ds.load_adapter")
    config = check_model_dir(base_dir)
    expected = ckpt.meta.get("base")
    if expected and adapter_io.signature(config) != adapter_io.signature(expected):
        raise PeftDsError(f"--merge-into-base {base_dir} is {adapter_io.signature(config)}, the adapter was trained "
                          f"on {adapter_io.signature(expected)}")
    headers = weight_shapes(base_dir)
    for name, shape in ckpt.shapes.items():
        stem, kind, _ = _split(name)
        if kind == SIBO_PARAMETER:
            continue
        weight = f"{stem}.weight"
        if weight not in headers:
            raise PeftDsError(f"--merge-into-base {base_dir} has no weight {weight} for adapter tensor {name}")
        rows, cols = headers[weight]
        if kind in ("lora_A", "bilora_Q") and shape[1] != cols or kind in ("lora_B", "bilora_P") and shape[0] != rows:
            raise PeftDsError(f"adapter tensor {name} {tuple(shape)} does not fit {weight} {headers[weight]} of "
                              f"{base_dir}")


# What a merged model takes from the base beside its merged safetensors shards: configuration,
# tokenizer (tokenizer.*) and generation files. Anything else, above all weights in another format than
# the one merged (pytorch_model-*.bin beside safetensors, *.pt, ...), would sit unmerged beside the merged
# weights: it is left out. A .bin-only base is merged into safetensors shards with an index of their own.
BASE_FILES_KEPT = ("config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def base_files(base_dir: str) -> tuple[list[str], list[str]]:
    """(files a merged model copies from the base, entries it leaves out), the merged weight files (the
    shards and index of the format merged) excluded."""
    from .models import weight_files

    _, shards, index = weight_files(base_dir)
    kept, left_out = [], []
    for entry in sorted(os.listdir(base_dir)):
        if entry in shards or entry == index:
            continue
        is_kept = os.path.isfile(os.path.join(base_dir, entry)) and (
            entry in BASE_FILES_KEPT or entry.startswith("tokenizer"))
        (kept if is_kept else left_out).append(entry)
    return kept, left_out


def _merge_into_base(state: dict, spec: PeftSpec, base_dir: str, out_dir: str, progress) -> int:
    """Copy of the base model directory (its configuration, tokenizer and generation files,
    `base_files`) with W + s B A in every adapted weight, one shard in memory at a time, as safetensors
    (`_merged_name`; a sharded base's index rewritten to those names). Returns the number of merged weights."""
    from safetensors.torch import save_file

    from .methods.lora import delta_weight
    from .models import read_shard, weight_files

    pending = {name.removesuffix(".lora_A"): name for name in state if name.endswith(".lora_A")}
    scaling = spec.alpha / spec.r
    merged = 0
    for entry in base_files(base_dir)[0]:
        shutil.copyfile(os.path.join(base_dir, entry), os.path.join(out_dir, entry))
    _, shards, index = weight_files(base_dir)
    weight_map = {}
    for shard in shards:
        weights, metadata = read_shard(base_dir, shard)
        storages = set()
        for key in list(weights):
            if weights[key].untyped_storage().data_ptr() in storages:  # a .bin may store tied weights once
                weights[key] = weights[key].clone()
            storages.add(weights[key].untyped_storage().data_ptr())
            stem = key.removesuffix(".weight")
            if key.endswith(".weight") and stem in pending:
                delta = delta_weight(state[f"{stem}.lora_A"], state[f"{stem}.lora_B"], scaling)
                weights[key] = (weights[key].float() + delta).to(weights[key].dtype)
                merged += 1
                progress.update(1)
            weights[key] = weights[key].contiguous()
            weight_map[key] = _merged_name(shard)
        save_file(weights, os.path.join(out_dir, _merged_name(shard)), metadata=metadata)
        del weights
    if index is not None:
        original = read_json(os.path.join(base_dir, index), "weights index")
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": original.get("metadata", {}), "weight_map": weight_map}, f, indent=2)
    return merged


def _check_output(path: str, out: str, merge_into_base: str | None) -> None:
    """The output is apart from everything consolidate reads (the checkpoints root: every tag and
    `latest`; the base model to merge into) and from what training wrote beside the checkpoints
    (config.yaml, metrics.jsonl, adapter/, ...), is neither the run directory nor holds it (a new
    `consolidated/` in the run is fine); its directory takes a new file."""
    root, _ = resolve_root(path)
    inputs = [("the checkpoint directory", root)]
    if merge_into_base:
        inputs.append(("the base model directory", merge_into_base))
    run = os.path.dirname(os.path.abspath(root))
    enclosing = []
    if os.path.basename(os.path.abspath(root)) == "checkpoints":
        enclosing.append(("the run directory", run))
        inputs += [(f"the run's {name}", os.path.join(run, name)) for name in checkpoint.RUN_OUTPUTS
                   if os.path.lexists(os.path.join(run, name))]
    outputs.check_apart(out, "--out", inputs, enclosing)
    outputs.check_writable(out)


def consolidate(path: str, out: str, tag: str | None = None, fmt: str = "native", merge_into_base: str | None = None,
                dtype: str = "fp32", keep_experts: bool = False, fold: bool = False, force: bool = False,
                progress: bool = True) -> dict:
    """The whole command; returns the summary. Every refusal comes before anything is written."""
    from tqdm.auto import tqdm

    began = time.perf_counter()
    if fmt not in FORMATS:
        raise PeftDsError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise PeftDsError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    _check_output(path, out, merge_into_base)
    outputs.recover(out)  # a previous output that a kill left aside is back before --force is considered
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise PeftDsError(f"output {out} exists (use --force to replace it)")
    plan = Plan(fmt, merge_into_base, dtype, keep_experts, fold)
    ckpt = open_checkpoint(path, tag)
    spec = _transform({}, ckpt.spec, plan)[1]  # the output's spec, known before any tensor is read
    if keep_experts and (fmt == "peft" or merge_into_base) and ckpt.spec.method.startswith("adamix"):
        raise PeftDsError("--keep-experts keeps the AdaMix experts, which have no PEFT or merged form; drop it to "
                          "average them (SPEC 2.4)")
    if fmt == "peft" and not merge_into_base:
        reason = adapter_io.peft_refusal(spec)
        if reason:
            raise PeftDsError(f"no PEFT export for this checkpoint: {reason}")
    if merge_into_base:
        _check_merge(ckpt, spec, merge_into_base)

    bar = tqdm(total=len(ckpt.shapes), desc="consolidate", unit="tensor", disable=not progress, dynamic_ncols=True)
    state = OrderedDict()
    for name, value in tensors(ckpt):
        state[name] = value
        bar.update(1)
    bar.close()
    state, spec, notes = _transform(state, ckpt.spec, plan)
    base_model = ckpt.meta.get("base_model") or ckpt.meta.get("config", {}).get("model", {}).get("name_or_path")
    origin = adapter_io.provenance("peft-ds consolidate", ckpt.tag_dir, ckpt.world_size, ckpt.meta.get("step"),
                                   ckpt.spec.method, notes, model_dtype=ckpt.meta.get("model_dtype"))
    with outputs.replace_dir(out) as staging:
        if merge_into_base:
            merge_bar = tqdm(total=sum(1 for k in state if k.endswith(".lora_A")), desc="merge", unit="weight",
                             disable=not progress, dynamic_ncols=True)
            written = _merge_into_base(state, spec, merge_into_base, staging, merge_bar)
            merge_bar.close()
            left_out = base_files(merge_into_base)[1]
            if left_out:
                notes.append(f"left out of the merged model (not configuration, tokenizer or safetensors weights): "
                             f"{', '.join(left_out)}")
            with open(os.path.join(staging, "peft_ds_merge.json"), "w") as f:
                json.dump({"peft_ds_version": __version__, "base_model": os.path.abspath(merge_into_base),
                           "peft_spec": spec.to_dict(), "source": origin["source"], "merged_weights": written,
                           "base_files_left_out": left_out}, f, indent=2)
        elif fmt == "peft":
            adapter_io.write_peft(state, staging, spec, base_model, dtype)
        else:
            adapter_io.write_adapter(state, staging, spec, base_model, ckpt.meta.get("base"), origin, dtype)
    nbytes = sum(v.numel() for v in state.values()) * torch.finfo(DTYPES[dtype]).bits // 8
    return {"out": out, "format": "merged model" if merge_into_base else fmt, "tensors": len(state),
            "bytes": nbytes, "seconds": time.perf_counter() - began, "tag": ckpt.tag,
            "world_size": ckpt.world_size, "method": spec.method, "notes": notes,
            "frozen_fragments_skipped": ckpt.frozen_fragments}
