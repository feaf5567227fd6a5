"""Training checkpoints: DeepSpeed ZeRO checkpoints without frozen parameters (adapter-sized), written
under `<output_dir>/checkpoints/<tag>/`, and the `latest` file moved into place only after every
rank's files exist, so a checkpoint cut off mid-write is never picked up. The one checkpoint reader
(`find_checkpoint`) is shared by resume and consolidation."""

from __future__ import annotations

import glob
import json
import os

import torch

from .errors import PeftDsError

LATEST = "latest"
META = "peft_ds_checkpoint.json"


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
    with open(meta_path) as f:
        meta = json.load(f)
    world = meta["world_size"]
    missing = [os.path.basename(p) for p in rank_files(tag_dir, world, meta["zero_stage"]) if not os.path.isfile(p)]
    if missing:
        raise PeftDsError(f"checkpoint {tag_dir} is incomplete: missing rank file {missing[0]}")
    extra = glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{world}_mp_rank_00_*_states.pt"))
    if extra:
        raise PeftDsError(f"checkpoint {tag_dir} has more rank files than its world size {world}")
    return tag, meta


def run_meta(model, config, world_size: int, zero_stage: int) -> dict:
    """What every checkpoint of a run records beside DeepSpeed's files: enough to consolidate it alone
    (the resolved PeftSpec, the base model and its signature) and to refuse a mismatched resume."""
    from .adapter_io import base_description

    return {"world_size": world_size, "zero_stage": zero_stage, "method": model.peft_spec.method,
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
        with open(os.path.join(tag_dir, META), "w") as f:
            json.dump({**meta, "step": step, "tag": tag}, f, indent=2)
        find_checkpoint(root, tag)  # every rank's files are there
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
    barrier()
    return tag


def load(engine, root: str, world_size: int, objective=None) -> tuple[int, dict]:
    """Resume: (step, meta) of the newest complete checkpoint, loaded into the engine."""
    tag, meta = find_checkpoint(root)
    if meta["world_size"] != world_size:
        raise PeftDsError(
            f"checkpoint {os.path.join(root, tag)} was written by {meta['world_size']} ranks, this run has "
            f"{world_size}: ZeRO partitions cannot be resumed on another world size"
        )
    _, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise PeftDsError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    if objective is not None:
        objective.load_state_dict(client.get("objective", {}))
    return int(client["step"]), meta
