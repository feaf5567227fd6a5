"""Consolidation time and peak memory: the same adapter on a ~10M and a ~1B backbone, and peft-ds
against DeepSpeed's `zero_to_fp32` on the same checkpoint, in one run.

Both backbones are LLaMA with hidden 512, 4 layers and 8 heads; they differ only in MLP width and
vocabulary (10M: intermediate 688, vocab 1024; 1B: intermediate 160000, vocab 32000), so LoRA r 64 on
q/k/v/o_proj is the same adapter (1.05M parameters, 4 MiB fp32) on both. Each checkpoint is written by
2 ZeRO-3 ranks after one optimizer step, with the frozen backbone's fragments in it (DeepSpeed's
default, `train.save_frozen_params`): 4 GB of fp32 backbone shards for the 1B one. Every
consolidation runs as its own process; time is the process's wall time (median of --repeats,
alternating tools; "work" is the command's own figure, imports excluded), peak memory its peak RSS
(os.wait4; MB = 10^6 bytes), beside a process that only imports the same modules. Goals: 1B/10M time <= 1.2; peak <= 3x the adapter's fp32 bytes + 300 MB; faster than
`zero_to_fp32 --exclude_frozen_parameters` (its fastest mode) on the 1B checkpoint.

    python bench/consolidate.py [--workdir /tmp/peft_ds_consolidate] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = {"10M": dict(intermediate_size=688, vocab_size=1024), "1B": dict(intermediate_size=160000, vocab_size=32000)}
SPEC = dict(method="lora", r=64, alpha=128, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def backbone_config(name):
    from peft_ds.models import preset_config

    return preset_config("tiny-llama", hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, **BACKBONES[name])


def write_checkpoints(workdir):
    """Under torchrun: for each backbone, build it partitioned, add the adapter, take one step, save."""
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from peft_ds import checkpoint, distributed, ds_config
    from peft_ds.config import ModelConfig, RunConfig
    from peft_ds.injection import adapter_parameters, apply_peft
    from peft_ds.models import build_from_config, return_freed_memory_to_os
    from peft_ds.spec import PeftSpec

    rank, world = distributed.init()
    return_freed_memory_to_os()
    for name in BACKBONES:
        ds = ds_config.resolve(ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")), hidden_size=512,
                               micro_batch_size=1, accumulation=1, world_size=world, dtype="fp32")
        keep = HfDeepSpeedConfig(ds)  # noqa: F841 (alive while the model is built)
        model = build_from_config(backbone_config(name))
        torch.manual_seed(0)
        spec = PeftSpec(**SPEC)
        apply_peft(model, spec)
        params = list(adapter_parameters(model).values())
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params, config=ds)
        ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        config = RunConfig(model=ModelConfig(name_or_path=f"bench-llama-{name}"), method=spec)
        meta = checkpoint.run_meta(model, config, world, 3, "fp32")
        checkpoint.save(engine, os.path.join(workdir, name, "checkpoints"), 1, meta, save_frozen=True)
        if rank == 0:
            numel = sum(p.ds_numel for p in model.parameters())
            print(json.dumps({"backbone": name, "params": numel}), flush=True)
        del engine, model, optimizer
    torch.distributed.destroy_process_group()


def measure(cmd) -> dict:
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss * 1024 / 1e6, "stdout": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/peft_ds_consolidate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (about 4 GB)")
    parser.add_argument("--reuse", action="store_true", help="reuse the checkpoints a --keep run left in --workdir")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.worker:
        return write_checkpoints(args.workdir)

    params_file = os.path.join(args.workdir, "params.json")
    if not (args.reuse and os.path.isfile(params_file)):
        shutil.rmtree(args.workdir, ignore_errors=True)
        os.makedirs(args.workdir)
        from peft_ds.distributed import free_port

        print("writing the checkpoints (2 ZeRO-3 ranks, one step, frozen fragments saved) ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                            "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "--workdir",
                            args.workdir], cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-4000:])
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        with open(params_file, "w") as f:
            json.dump({row["backbone"]: row["params"] for row in rows}, f)
    with open(params_file) as f:
        params = json.load(f)

    def files_mb(name):
        tag = os.path.join(args.workdir, name, "checkpoints", "step1")
        return sum(os.path.getsize(os.path.join(tag, f)) for f in os.listdir(tag)) / 2**20

    def ours(name, k):
        out = os.path.join(args.workdir, f"out_{name}_{k}")
        return [sys.executable, "-m", "peft_ds", "consolidate", os.path.join(args.workdir, name), "--out", out,
                "--quiet", "--force"]

    def theirs(name, k):
        out = os.path.join(args.workdir, f"z2f_{name}_{k}")
        return [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", os.path.join(args.workdir, name, "checkpoints"),
                out, "--exclude_frozen_parameters", "--safe_serialization", "-t", "step1"]

    baseline = measure([sys.executable, "-c", "import peft_ds.consolidate, safetensors.torch, tqdm.auto"])
    runs = {("peft-ds", "10M"): [], ("peft-ds", "1B"): [], ("zero_to_fp32", "1B"): []}
    for k in range(args.repeats):
        for (tool, name), rows in runs.items():
            rows.append(measure((ours if tool == "peft-ds" else theirs)(name, k)))
    def work(rows):  # the command's own figure: from its start to the output in place, imports excluded
        found = [re.search(r" in ([0-9.]+) s ", r["stdout"]) for r in rows]
        return statistics.median(float(m.group(1)) for m in found) if all(found) else float("nan")

    median = {key: {"seconds": statistics.median(r["seconds"] for r in rows), "work": work(rows),
                    "peak_mb": max(r["peak_mb"] for r in rows)} for key, rows in runs.items()}

    from safetensors.torch import load_file

    adapter = load_file(os.path.join(args.workdir, "out_1B_0", "adapter.safetensors"))
    adapter_mb = sum(v.numel() * 4 for v in adapter.values()) / 1e6
    z2f = load_file(os.path.join(args.workdir, "z2f_1B_0", "model.safetensors"))
    same = set(z2f) == set(adapter) and all(bool((z2f[k] == adapter[k]).all()) for k in adapter)

    print(f"\nbackbones: 10M = {params['10M'] / 1e6:.1f}M parameters ({files_mb('10M'):.0f} MiB checkpoint), "
          f"1B = {params['1B'] / 1e9:.2f}B ({files_mb('1B'):.0f} MiB checkpoint); the same adapter: "
          f"{len(adapter)} tensors, {adapter_mb:.1f} MB fp32")
    print(f"{'tool':<14}{'backbone':>9}{'wall s':>9}{'work s':>9}{'peak MB':>9}")
    for (tool, name), row in median.items():
        work = f"{row['work']:>9.2f}" if row["work"] == row["work"] else f"{'-':>9}"
        print(f"{tool:<14}{name:>9}{row['seconds']:>9.2f}{work}{row['peak_mb']:>9.0f}")
    print(f"{'imports only':<14}{'':>9}{baseline['seconds']:>9.2f}{'':>9}{baseline['peak_mb']:>9.0f}")
    ratio = median[("peft-ds", "1B")]["seconds"] / median[("peft-ds", "10M")]["seconds"]
    work_ratio = median[("peft-ds", "1B")]["work"] / median[("peft-ds", "10M")]["work"]
    peak_goal = 3 * adapter_mb + 300
    peak = max(median[("peft-ds", n)]["peak_mb"] for n in BACKBONES)
    speedup = median[("zero_to_fp32", "1B")]["seconds"] / median[("peft-ds", "1B")]["seconds"]
    print(f"\n1B / 10M time: {ratio:.2f} wall, {work_ratio:.2f} work (goal <= 1.2)")
    print(f"peak memory: {peak:.0f} MB, goal <= 3 x {adapter_mb:.1f} MB + 300 MB = {peak_goal:.0f} MB")
    print(f"zero_to_fp32 / peft-ds on the 1B checkpoint: {speedup:.1f}x (goal > 1); same tensors: {same}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
