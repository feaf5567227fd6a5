"""Helpers for the multi-process tests: run configs written to disk, launches of real ranks."""

import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = os.path.join(ROOT, "peft_ds", "assets", "math_sample.json")


def free_port():
    from peft_ds.distributed import free_port

    return free_port()


def write_config(path, output_dir, model="tiny-llama", method=None, deepspeed="zero3_cpu.json", num_layers=None,
                 cutoff_len=64, **train):
    config = {
        "model": {"name_or_path": model, "dtype": "fp32", **({"num_layers": num_layers} if num_layers else {})},
        "method": method or {"method": "lora", "r": 4, "alpha": 8},
        "data": {"train_file": MATH, "val_set_size": 0, "cutoff_len": cutoff_len},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 5, "lr": 1.0e-3, "warmup_steps": 0,
                  "save_every": 0, "eval_every": 0, **train},
        "deepspeed": os.path.join(ROOT, "ds_configs", deepspeed),
        "output_dir": str(output_dir),
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def torchrun(nproc, configs, timeout=900):
    """All `configs` trained one after another in one launch of `nproc` ranks (tests/multi_train.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "tests", "multi_train.py"), *configs]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def peft_ds(*args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "peft_ds", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def adapter(output_dir):
    return load_file(os.path.join(str(output_dir), "adapter", "adapter.safetensors"))


def losses(output_dir):
    import json

    with open(os.path.join(str(output_dir), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def bin_model_dir(src, dst, shards=2):
    """A copy of the safetensors model directory `src` in the form of the papers' era: `shards` PyTorch
    .bin shards (torch.save of plain state dicts) with pytorch_model.bin.index.json, or one
    pytorch_model.bin (shards=1); no safetensors."""
    import json
    import shutil

    os.makedirs(dst)
    for name in os.listdir(src):
        if not (name.endswith(".safetensors") or name == "model.safetensors.index.json"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    state = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(src, name)))
    keys = sorted(state)
    if shards == 1:
        torch.save(state, os.path.join(dst, "pytorch_model.bin"))
        return str(dst)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = keys[k::shards]
        torch.save({key: state[key] for key in part}, os.path.join(dst, shard))
        weight_map.update({key: shard for key in part})
    with open(os.path.join(dst, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f)
    return str(dst)


def relative_difference(a, b):
    """Largest per-tensor ||a - b|| / ||b|| over two adapter state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def assert_same_adapter(a, b, tol=1e-5):
    worst = relative_difference(a, b)
    assert worst <= tol, f"adapters differ: relative difference {worst:.3g} > {tol}"


__all__ = ["ROOT", "MATH", "write_config", "torchrun", "peft_ds", "adapter", "losses", "assert_same_adapter",
           "relative_difference", "bin_model_dir", "torch"]
