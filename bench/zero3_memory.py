"""Per-rank memory of a ZeRO-3-partitioned frozen LLaMA backbone (default 3.1B parameters, bf16; at least 1B).

Measured side by side in one run:
  1. building the backbone under ZeRO-3 (HfDeepSpeedConfig before construction) with 1 rank and with
     2 ranks: per-rank peak resident memory above the process's baseline (after imports), and the
     2-rank / 1-rank ratio (goal <= 0.6);
  2. loading the same backbone from a saved Hugging Face directory (safetensors) with 2 ranks: per-rank
     peak against the full model's bytes (goal: no rank above ~0.6 of it).
Peaks are sampled every 5 ms from /proc/self/status: RSS (VmRSS) and its anonymous part (RssAnon;
file pages of memory-mapped safetensors count in RSS but are the page cache, shared and reclaimable).

    python bench/zero3_memory.py [--hidden 3072 --layers 26 --intermediate 8192] [--workdir /tmp/z3mem]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore")


def _status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class PeakSampler:
    def __init__(self):
        self.peak = _status()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            now = _status()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.005)

    def __enter__(self):
        self.peak = _status()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def llama_config(args):
    from peft_ds.models import preset_config

    return preset_config("tiny-llama", vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128)


def worker(args):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from peft_ds import distributed, ds_config
    from peft_ds.models import build_from_config, zero3_build_memory

    rank, world = distributed.init()
    ds = ds_config.resolve(ds_config.load(os.path.join(args.root, "ds_configs", "zero3_bf16.json")),
                           hidden_size=args.hidden, micro_batch_size=1, accumulation=1, world_size=world, dtype="bf16")
    base = _status()
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 (alive while the model is built)
    memory = contextlib.nullcontext() if args.no_mallopt else zero3_build_memory()  # as models.build_model
    with PeakSampler() as sampler, memory:
        if args.worker == "build":
            model = build_from_config(llama_config(args), dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, local_files_only=True)
        distributed.barrier()
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(json.dumps({"rank": rank, "world": world, "params": numel,
                      "rss": sampler.peak["VmRSS"] - base["VmRSS"], "anon": sampler.peak["RssAnon"] - base["RssAnon"]}),
          flush=True)
    torch.distributed.destroy_process_group()


def launch(args, mode, nproc, extra=()):
    from peft_ds.distributed import free_port

    port, procs = str(free_port()), []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", mode, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--intermediate", str(args.intermediate), *(["--no-mallopt"] if args.no_mallopt else []), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, f"{mode} worker failed ({p.returncode})"
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--workdir", default="/tmp/peft_ds_zero3_memory")
    parser.add_argument("--no-mallopt", action="store_true",
                        help="measure without peft-ds's malloc setting (shows what it saves)")
    parser.add_argument("--worker", choices=["build", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, args.root)
    if args.worker:
        return worker(args)

    gb = 1024**3
    one = launch(args, "build", 1)
    two = launch(args, "build", 2)
    params = one[0]["params"]
    full = 2 * params  # bf16 bytes of the whole backbone
    print(f"LLaMA config hidden={args.hidden} layers={args.layers} intermediate={args.intermediate} vocab=32000: "
          f"{params / 1e9:.2f}B parameters, {full / gb:.2f} GiB in bf16")
    print("1. build under ZeRO-3 (peak above baseline, per rank)")
    for rows in (one, two):
        for r in rows:
            print(f"   {r['world']} rank(s), rank {r['rank']}: RSS {r['rss'] / gb:6.2f} GiB  anon {r['anon'] / gb:6.2f} GiB")
    ratio = max(r["rss"] for r in two) / one[0]["rss"]
    print(f"   2-rank / 1-rank per-rank peak: {ratio:.3f}   (goal <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'})")

    # a saved HF directory of the same backbone (written by one plain process, not measured)
    model_dir = os.path.join(args.workdir, "llama-1b")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    subprocess.run([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, %r); from bench.zero3_memory import llama_config; "
        "from peft_ds.models import build_from_config; import argparse; "
        "a = argparse.Namespace(hidden=%d, layers=%d, intermediate=%d); "
        "build_from_config(llama_config(a), dtype=torch.bfloat16).save_pretrained(%r)"
    ) % (args.root, args.hidden, args.layers, args.intermediate, model_dir)], check=True, cwd=args.root,
        stderr=subprocess.DEVNULL)
    load = launch(args, "load", 2, ["--model-dir", model_dir])
    print("2. load the saved HF directory with 2 ranks (peak above baseline, per rank)")
    for r in load:
        print(f"   rank {r['rank']}: RSS {r['rss'] / gb:6.2f} GiB ({r['rss'] / full:.2f} of the model)  "
              f"anon {r['anon'] / gb:6.2f} GiB ({r['anon'] / full:.2f} of the model)")
    worst = max(r["anon"] for r in load) / full
    print(f"   largest per-rank anonymous peak / model bytes: {worst:.3f}   (goal <= 0.6: "
          f"{'met' if worst <= 0.6 else 'NOT met'})")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
