"""Training checkpoints: DeepSpeed ZeRO checkpoints without frozen parameters (adapter-sized), written
under `<output_dir>/checkpoints/<tag>/`, and the `latest` file moved into place only after every
rank's files exist, so a checkpoint cut off mid-write is never picked up. The one checkpoint reader
(`find_checkpoint`) is shared by resume and consolidation."""

from __future__ import annotations

import glob
import json
import os
import zipfile

import torch

from .errors import PeftDsError, read_json
from .reporting import TENSORBOARD_DIR, WANDB_DIR

LATEST = "latest"
META = "peft_ds_checkpoint.json"
# What `peft-ds train` writes into a run directory besides `checkpoints/` (BiLoRA adds lam.*): the
# results that no other command's output may replace.
RUN_OUTPUTS = ("config.yaml", "ds_config.json", "metrics.jsonl", "loss.png", "adapter", "preempted.json", "lam.json",
               "lam.png", TENSORBOARD_DIR, WANDB_DIR)


def rank_files(tag_dir: str, world_size: int, zero_stage: int = 3) -> list[str]:
    """The files DeepSpeed writes for a checkpoint: per-rank model states under ZeRO-3 (one shared file
    otherwise), per-rank optimizer states under ZeRO 1-3 (inside the model states without ZeRO)."""
    if zero_stage == 3:
        models = [os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world_size)]
    else:
        models = [os.path.join(tag_dir, "mp_rank_00_model_states.pt")]
    return models + (_optim_files(tag_dir, world_size) if zero_stage > 0 else [])


def _optim_files(tag_dir: str, world_size: int) -> list[str]:
    files = []
    for rank in range(world_size):
        plain = os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        bf16 = os.path.join(tag_dir, f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        files.append(bf16 if os.path.exists(bf16) else plain)
    return files


def find_checkpoint(root: str, tag: str | None = None) -> tuple[str, dict]:
    """(tag, meta) of the checkpoint `tag` (default: the one `latest` names), checked complete:
    every rank's model and optimizer file present, no extra ranks. Errors say what is wrong."""
    if tag is None:
        latest = os.path.join(root, LATEST)
        if not os.path.isfile(latest):
            raise PeftDsError(f"no complete checkpoint in {root}: there is no '{LATEST}' file")
        with open(latest) as f:
            tag = f.read().strip()
    tag_dir = os.path.join(root, tag)
    if not os.path.isdir(tag_dir):
        raise PeftDsError(f"there is no checkpoint {tag} in {root}")
    meta_path = os.path.join(tag_dir, META)
    if not os.path.isfile(meta_path):
        raise PeftDsError(f"checkpoint {tag_dir} is incomplete: {META} is missing")
    meta = read_json(meta_path, "checkpoint meta")
    world = meta["world_size"]
    missing = [os.path.basename(p) for p in rank_files(tag_dir, world, meta["zero_stage"]) if not os.path.isfile(p)]
    if missing:
        raise PeftDsError(f"checkpoint {tag_dir} is incomplete: missing rank file {missing[0]}")
    extra = glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{world}_mp_rank_00_*_states.pt"))
    if extra:
        raise PeftDsError(f"checkpoint {tag_dir} has more rank files than its world size {world}")
    return tag, meta


def run_meta(model, config, world_size: int, zero_stage: int, model_dtype: str) -> dict:
    """What every checkpoint of a run records beside DeepSpeed's files: enough to consolidate it alone
    (the resolved PeftSpec, the base model and its signature, the dtype it trained in) and to refuse a
    mismatched resume."""
    from .adapter_io import base_description

    return {"world_size": world_size, "zero_stage": zero_stage, "model_dtype": model_dtype, "method": model.peft_spec.method,
            "peft_spec": model.peft_spec.to_dict(), "base_model": config.model.name_or_path,
            "base": base_description(model), "config": config.to_dict()}


def save(engine, root: str, step: int, meta: dict, objective_state: dict | None = None,
         save_frozen: bool = False) -> str:
    """Collective: every rank writes its files; rank 0 then writes the meta file and moves `latest`."""
    from .distributed import barrier

    tag = f"step{step}"
    engine.save_checkpoint(root, tag=tag, client_state={"step": step, "objective": objective_state or {}},
                           save_latest=False, exclude_frozen_parameters=not save_frozen)
    barrier()
    if torch.distributed.get_rank() == 0:
        tag_dir = os.path.join(root, tag)
        sizes = {os.path.basename(p): os.path.getsize(p) for p in rank_files(tag_dir, meta["world_size"],
                                                                              meta["zero_stage"])}
        with open(os.path.join(tag_dir, META), "w") as f:
            json.dump({**meta, "step": step, "tag": tag, "file_sizes": sizes}, f, indent=2)
        find_checkpoint(root, tag)  # every rank's files are there
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
    barrier()
    return tag


def check_files(tag_dir: str, meta: dict) -> None:
    """Every rank file whole: the size the meta file records (checkpoints since issue 14) and a torch
    zip archive's closing record (any checkpoint). Reading them (the optimizer states hold more than
    tensors, so not with weights_only) is left to DeepSpeed."""
    recorded = meta.get("file_sizes", {})
    for path in rank_files(tag_dir, meta["world_size"], meta["zero_stage"]):
        name, size = os.path.basename(path), os.path.getsize(path)
        if name in recorded and size != recorded[name]:
            raise PeftDsError(f"checkpoint {tag_dir} is damaged: {name} has {size} bytes, {META} records "
                              f"{recorded[name]}")
        if not zipfile.is_zipfile(path):  # torch.save's archive ends with its directory: a cut file has none
            raise PeftDsError(f"checkpoint {tag_dir} is damaged: {name} is not a complete torch file (truncated?)")


def check_resume(tag_dir: str, meta: dict, model, source, world_size: int, zero_stage: int) -> None:
    """Before any rank starts: the checkpoint fits this run, whose adapters are injected into `model`
    (the meta-device skeleton of `source`, the run config's model section): the same method, base shape, adapter parameter names
    and shapes (the checkpoint's spec injected into a second skeleton), world size and ZeRO stage.
    One line names the difference."""
    from .adapter_io import model_signature
    from .injection import adapter_parameters, apply_peft
    from .models import build_skeleton
    from .spec import PeftSpec

    check_files(tag_dir, meta)
    spec = model.peft_spec
    if meta["method"] != spec.method:
        raise PeftDsError(f"the checkpoint in {tag_dir} was trained with method {meta['method']}, the config asks "
                          f"for {spec.method}")
    if meta["world_size"] != world_size:
        raise PeftDsError(f"checkpoint {tag_dir} was written by {meta['world_size']} ranks, this run has "
                          f"{world_size}: ZeRO partitions cannot be resumed on another world size")
    if meta["zero_stage"] != zero_stage:
        raise PeftDsError(f"checkpoint {tag_dir} was written under ZeRO stage {meta['zero_stage']}, the DeepSpeed "
                          f"config has stage {zero_stage}")
    base = {k: meta["base"].get(k) for k in model_signature(model)}
    if base != model_signature(model):
        raise PeftDsError(f"checkpoint {tag_dir} was trained on a base with {base}, this run's model {source.name_or_path} "
                          f"has {model_signature(model)}")
    saved, asked = meta["peft_spec"], spec.to_dict()
    if saved == asked:
        return
    changed = ", ".join(f"method.{k}: {saved.get(k)!r} in the checkpoint, {asked[k]!r} in the config"
                        for k in asked if saved.get(k) != asked[k])
    skeleton = build_skeleton(source.name_or_path, source.num_layers)
    try:
        with torch.random.fork_rng(devices=[]):
            apply_peft(skeleton, PeftSpec.from_dict(saved))
    except PeftDsError as err:
        raise PeftDsError(f"checkpoint {tag_dir} does not fit this model: {err}") from None
    shapes = {n: tuple(p.shape) for n, p in adapter_parameters(skeleton).items()}
    if shapes != {n: tuple(p.shape) for n, p in adapter_parameters(model).items()}:
        raise PeftDsError(f"checkpoint {tag_dir} holds other adapter parameters than the config asks for "
                          f"({changed}): resume with the checkpoint's settings or choose another output_dir")


def load(engine, root: str, objective=None) -> tuple[int, dict]:
    """Resume: (step, meta) of the newest complete checkpoint, loaded into the engine (that it fits this
    run, world size included, `check_resume` has checked before any rank started)."""
    tag, meta = find_checkpoint(root)
    try:
        _, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:  # a file damaged after the checks
        raise PeftDsError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}: "
                          f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if client is None:
        raise PeftDsError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    if objective is not None:
        objective.load_state_dict(client.get("objective", {}))
    return int(client["step"]), meta
