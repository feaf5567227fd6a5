"""peft-ds train against the stack users would pick instead (transformers Trainer + HF peft LoRA +
DeepSpeed ZeRO-3), side by side, each launched as users launch it:

    peft-ds:  python -m peft_ds train CONFIG --nproc 2
    peer:     torchrun --nproc_per_node 2 bench/peer_trainer.py ...

The same work on both sides: one saved LLaMA directory (tiny-llama's classes and tokenizer enlarged to
--hidden, 64-dim heads, bench/common.py), LoRA r 32 / alpha 64 / dropout 0.05 on q,k,v,up,down, the
same micro-batches of the shipped math sample (peft-ds's own Feed, written out padded for the peer),
micro-batch 4, global 8, 2 gloo ranks, fp32, peft-ds's resolved ds_configs/zero3_cpu.json for both,
lr 3e-4 linear without warm-up, AdamW (torch, not fused), gradient clipping 1.0; --steps optimizer
steps; each run ends by saving its adapter (peft-ds also writes its final checkpoint and loss plot).
Runs alternate (peft-ds, peer, then peft-ds's Adapter and LoRA-SIBO, which the peer stack lacks),
--rounds times; every figure is the median over rounds (range beside it).

Measured per run, from outside the processes:
  step       median over steps 6..N of forward + backward + optimizer step. Peer: a TrainerCallback,
             on_step_begin -> on_step_end (batch fetch and logging excluded). peft-ds: from metrics.jsonl,
             the step's tokens / tokens_per_s, i.e. the same plus collating its 4 records and the
             all-reduce of 4 floats (under 2 ms here; against peft-ds).
  peak RSS   VmHWM of each rank (the larger rank reported), read from /proc every 50 ms until it exits.
  launcher   VmRSS of the launched process while the ranks train (from the end of the first step; max
             over samples): `--nproc`'s parent, torchrun; and its largest VmRSS over the whole run
             (peft-ds: the checks, with torch, transformers and DeepSpeed imported, while the ranks
             import).
  wall       launch -> end of the first optimizer step (peer: its callback's clock; peft-ds: the mtime of
             metrics.jsonl when its first loss row appears), launch -> exit of the launcher.
  CPU/step   the ranks' CPU seconds (user + system, both ranks) per step over steps 6..N, sampled from
             /proc when each step's row appears: the work of a step, which a shared CPU does not
             stretch as it stretches wall time.
  faults/CPU minor page faults, system and user CPU of the launcher and all ranks (wait4).
Model-FLOPs use of the peft-ds LoRA step (`model_flops` states the count) at --hidden and at
--mfu-hidden, over the fp32 GEMM ceiling of the ranks' threads (2 processes x 1 thread, torch.mm,
measured in this run before and after the timed runs, the best size): by wall clock (model FLOP/s over
the 2 processes' summed GEMM FLOP/s) and per CPU-second (model FLOPs over the ranks' CPU seconds, over
one GEMM thread's FLOPs per CPU-second), the latter unchanged by other work on a shared CPU.

    python bench/vs_trainer.py [--rounds 3] [--steps 30] [--hidden 512] [--layers 4] [--mfu-hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from common import enlarged_llama_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
MIB = 1024**2
ARMS = {  # name: peft-ds method fields (None: the peer stack)
    "peft-ds LoRA": {"method": "lora", "r": 32, "alpha": 64, "target_modules": list(LORA_TARGETS)},
    "Trainer+peft LoRA": None,
    "peft-ds LoRA-SIBO": {"method": "lora", "r": 32, "alpha": 64, "target_modules": list(LORA_TARGETS),
                          "sibo_lambda": 0.1},
    "peft-ds Adapter": {"method": "adapter", "bottleneck_size": 256},
}


# ---- the shared inputs ------------------------------------------------------------------------------

def prepare(args, hidden: int, workdir: str) -> dict:
    """Model directory, peft-ds run configs, the resolved DeepSpeed config and the padded micro-batches
    of every step (in the peer's sampler order) for one width."""
    import torch
    import yaml

    from peft_ds import train
    from peft_ds.config import load_config
    from peft_ds.models import TINY_TOKENIZER, build_from_config
    from peft_ds.objective import Feed
    from peft_ds.tokenizer import TOKENIZER_MODEL

    os.makedirs(workdir)
    config = enlarged_llama_config(hidden, args.layers)
    model_dir = os.path.join(workdir, "model")
    build_from_config(config).save_pretrained(model_dir)
    shutil.copyfile(TINY_TOKENIZER, os.path.join(model_dir, TOKENIZER_MODEL))

    def run_config(name, method, out):
        path = os.path.join(workdir, name.replace(" ", "_") + ".yaml")
        with open(path, "w") as f:
            yaml.safe_dump({
                "model": {"name_or_path": model_dir},
                "method": method,
                "data": {"train_file": os.path.join(ROOT, "peft_ds", "assets", "math_sample.json"),
                         "val_set_size": 0, "cutoff_len": 256},
                "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": args.steps, "lr": 3e-4,
                          "warmup_steps": 0, "save_every": 0, "eval_every": 0, "log_every": 1, "seed": 42},
                "deepspeed": os.path.join(ROOT, "ds_configs", "zero3_cpu.json"),
                "output_dir": out,
            }, f)
        return path

    configs = {name: run_config(name, method, os.path.join(workdir, "runs", "RUN")) for name, method in ARMS.items()
               if method is not None}
    probe = load_config(configs["peft-ds LoRA"], [])
    run = train.prepare(probe, 2)
    ds_path = os.path.join(workdir, "ds_config.json")
    with open(ds_path, "w") as f:
        json.dump(run["ds"], f, indent=2)
    pad_id = run["tokenizer"].pad_token_id
    feeds = [Feed(rank=r, world=2, accumulation=1, micro=4, global_batch=8, pad_id=pad_id, seed=42,
                  device=torch.device("cpu")) for r in range(2)]
    batches_path, steps = os.path.join(workdir, "batches.jsonl"), []
    with open(batches_path, "w") as f:
        for step in range(args.steps):
            shapes, tokens = [], 0
            for feed in feeds:  # rank 0's micro-batch, then rank 1's: batch 2s and 2s+1 of the sampler
                (batch,) = feed.micro_batches(run["train_set"], step).batches
                shapes.append(tuple(batch["input_ids"].shape))
                tokens += int(batch["attention_mask"].sum())
                for row in range(batch["input_ids"].shape[0]):
                    f.write(json.dumps({k: v[row].tolist() for k, v in batch.items()}) + "\n")
            steps.append({"shapes": shapes, "tokens": tokens})
    return {"hidden": hidden, "config": config, "model_dir": model_dir, "configs": configs, "ds": ds_path,
            "batches": batches_path, "steps": steps, "workdir": workdir}


# ---- model FLOPs -------------------------------------------------------------------------------------

def model_flops(config, shapes, method: dict) -> float:
    """Model FLOPs of one optimizer step over micro-batches `shapes` [(batch, padded length), ...]: per
    token, forward 2N and backward 2N through the frozen matmuls (N: q,k,v,o,gate,up,down of every layer
    and the LM head; the input gradients of layer 0's q,k,v are not needed and not counted), a LoRA
    matmul pair d_in -> r -> d_out 6 r (d_in + d_out) (forward, input and weight gradients); attention
    scores and values 4 s h per token and layer forward, twice that backward (full s x s: the padding
    mask rules out the causal kernel). Norms, activations, softmax and the loss are not counted."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    n = layers * sum(i * o for i, o in dims.values()) + h * vocab
    skipped = sum(i * o for name, (i, o) in dims.items() if name in ("q_proj", "k_proj", "v_proj"))
    adapter = layers * sum(6 * method["r"] * (dims[t][0] + dims[t][1]) for t in method["target_modules"])
    total = 0.0
    for b, s in shapes:
        tokens = b * s
        total += tokens * (4 * n - 2 * skipped + adapter) + layers * 12 * b * s * s * h
    return total


def gemm_worker(start: float, seconds: float):
    """One thread of torch.mm in fp32 at a few sizes, each size from a shared wall-clock start: GFLOP/s."""
    import torch

    torch.set_num_threads(1)
    sizes = [(1024, 1024, 1024), (2048, 2048, 2048), (1024, 512, 1368), (1024, 1368, 512)]
    rates = {}
    for k, (m, kk, n) in enumerate(sizes):
        a, b = torch.randn(m, kk), torch.randn(kk, n)
        torch.mm(a, b)
        while time.time() < start + k * (seconds + 0.5):
            time.sleep(0.005)
        count, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            count += 1
        flops = 2 * m * kk * n * count / 1e9
        rates[f"{m}x{kk}x{n}"] = (flops / (time.perf_counter() - t0), flops / (time.process_time() - c0))
    print(json.dumps(rates), flush=True)


def gemm_ceiling(processes: int = 2, seconds: float = 2.0) -> tuple[float, float, dict]:
    """Summed GFLOP/s of `processes` single-thread processes running torch.mm at once, and GFLOP per
    CPU-second of one such thread (what a shared CPU leaves unchanged); each the best size."""
    start = time.time() + 8  # after every worker has imported torch
    procs = [subprocess.Popen([sys.executable, __file__, "--gemm-worker", str(start), str(seconds)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(processes)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    summed = {size: sum(r[size][0] for r in rates) for size in rates[0]}
    per_cpu_second = {size: statistics.mean(r[size][1] for r in rates) for size in rates[0]}
    return max(summed.values()), max(per_cpu_second.values()), summed


# ---- one run, measured from outside -----------------------------------------------------------------

def _read_status(pid: int) -> dict:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "PPid"):
                    values[key] = int(rest.split()[0]) * (1024 if key != "PPid" else 1)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return {}
    return values


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(v.startswith(b"RANK=") for v in f.read().split(b"\0"))
    except OSError:
        return False


class Monitor:
    """Samples the launched process tree every 50 ms: each rank's VmHWM (last seen), the launcher's
    VmRSS while the ranks train (from the end of the first step) and over the whole run, and when the
    first optimizer step ended (`first_step`)."""

    def __init__(self, root: int, first_step, steps_done):
        self.root, self.first_step_probe, self.steps_done = root, first_step, steps_done
        self.cpu_at_step = {}  # steps logged -> the ranks' CPU seconds (user + system) when first seen
        self.rank_hwm, self.launcher_rss, self.launcher_hwm, self.first_step = {}, 0, 0, None
        self.ranks_started = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _tree(self):
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, frontier = [], [self.root]
        while frontier:
            kids = [p for p, pp in parents.items() if pp in frontier]
            tree += kids
            frontier = kids
        return tree

    def _run(self):
        known_ranks = set()
        while not self.stop.is_set():
            ranks = [p for p in self._tree() if p in known_ranks or _is_rank(p)]
            known_ranks.update(ranks)
            if ranks and self.ranks_started is None:
                self.ranks_started = time.time()
            for pid in ranks:
                hwm = _read_status(pid).get("VmHWM")
                if hwm:
                    self.rank_hwm[pid] = max(self.rank_hwm.get(pid, 0), hwm)
            if self.first_step is None:
                self.first_step = self.first_step_probe()
            done = self.steps_done()
            if done and done not in self.cpu_at_step:
                self.cpu_at_step[done] = sum(_cpu_seconds(p) for p in ranks)
            root = _read_status(self.root)
            if root:
                self.launcher_hwm = max(self.launcher_hwm, root.get("VmRSS", 0))
                if ranks and self.first_step is not None:
                    self.launcher_rss = max(self.launcher_rss, root.get("VmRSS", 0))
            self.stop.wait(0.05)

    def close(self):
        self.stop.set()
        self.thread.join()


def _cpu_per_step(cpu_at_step: dict, warm: int, steps: int) -> float:
    """The ranks' CPU seconds (both, user + system) per step from step `warm` to `steps`: the work of a
    step whatever else the machine runs (wall time under a shared CPU is not)."""
    seen = sorted(k for k in cpu_at_step if k >= warm)
    if len(seen) < 2:
        return float("nan")
    return (cpu_at_step[seen[-1]] - cpu_at_step[seen[0]]) / (seen[-1] - seen[0])


def run_arm(name: str, shape: dict, args, index: int) -> dict:
    method = ARMS[name]
    out = os.path.join(shape["workdir"], "runs", f"{index:02d}_{name.replace(' ', '_')}")
    os.makedirs(out)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE")}
    if method is None:
        from peft_ds.distributed import free_port

        env["DS_ACCELERATOR"] = "cpu"
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
               "--master_port", str(free_port()), os.path.join(ROOT, "bench", "peer_trainer.py"),
               "--model", shape["model_dir"], "--batches", shape["batches"], "--deepspeed", shape["ds"],
               "--out", out, "--steps", str(args.steps)]
        log_path = os.path.join(out, "steps.jsonl")
    else:
        cmd = [sys.executable, "-m", "peft_ds", "train", shape["configs"][name], "--nproc", "2",
               "--set", f"output_dir={out}"]
        log_path = os.path.join(out, "metrics.jsonl")

    def first_step():
        try:
            with open(log_path) as f:
                if '"loss"' not in f.read():
                    return None
        except FileNotFoundError:
            return None
        if method is None:
            with open(log_path) as f:
                return json.loads(f.readline())["end"]
        return os.stat(log_path).st_mtime

    def steps_done():
        try:
            with open(log_path) as f:
                return f.read().count('"loss"')
        except FileNotFoundError:
            return 0

    with open(os.path.join(out, "stdout.log"), "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = Monitor(proc.pid, first_step, steps_done)
        _, status, usage = os.wait4(proc.pid, 0)
        exited = time.time()
        monitor.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}); see {out}/stdout.log")
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    if method is None:
        step_s = [r["step_s"] for r in rows]
    else:
        step_s = [shape["steps"][r["step"] - 1]["tokens"] / r["tokens_per_s"] for r in rows]
    if len(step_s) != args.steps:
        raise SystemExit(f"{name}: {len(step_s)} step times for {args.steps} steps in {log_path}")
    timed = range(args.warm_steps, args.steps)
    result = {"arm": name, "step": statistics.median(step_s[k] for k in timed), "loss1": rows[0]["loss"],
              "rank_peak": max(monitor.rank_hwm.values()), "ranks_seen": len(monitor.rank_hwm),
              "launcher": monitor.launcher_rss, "launcher_peak": monitor.launcher_hwm,
              "first_step": (monitor.first_step or exited) - launched, "exit": exited - launched,
              "ranks_started": (monitor.ranks_started or exited) - launched,
              "step_cpu": _cpu_per_step(monitor.cpu_at_step, args.warm_steps, args.steps),
              "minflt": usage.ru_minflt, "stime": usage.ru_stime, "utime": usage.ru_utime, "step_s": step_s}
    if method is not None and method["method"] == "lora" and not method.get("sibo_lambda"):
        flops = [model_flops(shape["config"], shape["steps"][k]["shapes"], method) for k in range(args.steps)]
        result["flops_per_s"] = statistics.median(flops[k] / step_s[k] for k in timed)
        result["flops_per_cpu_s"] = sum(flops[k] for k in timed) / (result["step_cpu"] * len(timed))
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    print(f"  {name:<20} step {result['step'] * 1e3:7.1f} ms  CPU/step {result['step_cpu'] * 1e3:7.1f} ms  rank peak {result['rank_peak'] / MIB:6.0f} MiB  "
          f"launcher {result['launcher'] / MIB:5.0f} MiB  first step {result['first_step']:5.1f} s  "
          f"exit {result['exit']:5.1f} s  minflt {result['minflt'] / 1e6:5.2f} M  sys {result['stime']:5.1f} s  "
          f"loss1 {result['loss1']:.5f}", flush=True)
    return result


# ---- report ------------------------------------------------------------------------------------------

FIELDS = [  # key, label, unit scale, format
    ("step", "median step (steps {w}-{n})", 1e3, "{:.0f} ms"),
    ("step_cpu", "ranks' CPU per step (both, steps {w}-{n})", 1e3, "{:.0f} ms"),
    ("rank_peak", "peak RSS, larger rank", 1 / MIB, "{:.0f} MiB"),
    ("launcher", "launcher RSS while ranks train", 1 / MIB, "{:.0f} MiB"),
    ("launcher_peak", "launcher RSS, whole run (max)", 1 / MIB, "{:.0f} MiB"),
    ("ranks_started", "wall, launch to ranks started", 1, "{:.1f} s"),
    ("first_step", "wall, launch to first step end", 1, "{:.1f} s"),
    ("exit", "wall, launch to exit", 1, "{:.1f} s"),
    ("minflt", "minor page faults", 1e-6, "{:.2f} M"),
    ("stime", "system CPU", 1, "{:.1f} s"),
    ("utime", "user CPU", 1, "{:.1f} s"),
]


def summary(results: list[dict], name: str, key: str) -> tuple[float, str]:
    values = [r[key] for r in results if r["arm"] == name]
    return statistics.median(values), f"{min(values)}-{max(values)}"


def report(results: list[dict], args) -> None:
    names = [n for n in ARMS if any(r["arm"] == n for r in results)]
    ours, peer = "peft-ds LoRA", "Trainer+peft LoRA"
    print(f"\nmedians over {args.rounds} round(s) (range)")
    header = "| | " + " | ".join(names) + f" | {ours} / peer |"
    print(header + "\n|" + "---|" * (len(names) + 2))
    for key, label, scale, fmt in FIELDS:
        cells = []
        for n in names:
            values = [r[key] * scale for r in results if r["arm"] == n]
            med = statistics.median(values)
            cells.append(fmt.format(med) + (f" ({fmt.format(min(values)).split()[0]}-{fmt.format(max(values))})"
                                            if len(values) > 1 else ""))
        ratio = statistics.median(r[key] for r in results if r["arm"] == ours) / statistics.median(
            r[key] for r in results if r["arm"] == peer) if ours in names and peer in names else float("nan")
        print(f"| {label.format(w=args.warm_steps + 1, n=args.steps)} | " + " | ".join(cells) + f" | **{ratio:.3f}** |")
    loss = {n: statistics.median(r["loss1"] for r in results if r["arm"] == n) for n in names}
    print("step-1 loss: " + ", ".join(f"{n} {v:.5f}" for n, v in loss.items()))

    def med(name, key):
        return statistics.median(r[key] for r in results if r["arm"] == name)

    if ours in names and peer in names:
        goals = [("step time <= 0.95 x peer", med(ours, "step") / med(peer, "step"), 0.95),
                 ("  (CPU per step <= 0.95 x peer)", med(ours, "step_cpu") / med(peer, "step_cpu"), 0.95),
                 ("peak per-rank RSS <= peer", med(ours, "rank_peak") / med(peer, "rank_peak"), 1.0),
                 ("launcher RSS <= torchrun", med(ours, "launcher") / med(peer, "launcher"), 1.0),
                 ("launch to first step <= peer", med(ours, "first_step") / med(peer, "first_step"), 1.0),
                 ("launch to exit <= peer", med(ours, "exit") / med(peer, "exit"), 1.0)]
        for label, ratio, goal in goals:
            print(f"  {label:<30} {ratio:.3f}  ({'met' if ratio <= goal else 'NOT met'})")
    for n in names:
        if n not in (ours, peer):
            versus_peer = f"   {n} / peer step: {med(n, 'step') / med(peer, 'step'):.3f}" if peer in names else ""
            print(f"  {n} / {ours} step: {med(n, 'step') / med(ours, 'step'):.3f}" + versus_peer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warm-steps", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    parser.add_argument("--mfu-hidden", type=int, default=1024, help="also time peft-ds LoRA at this width (0: no)")
    parser.add_argument("--workdir", default="/tmp/peft_ds_vs_trainer")
    parser.add_argument("--gemm-worker", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gemm_worker:
        return gemm_worker(*args.gemm_worker)
    sys.path.insert(0, ROOT)
    import warnings

    warnings.filterwarnings("ignore")
    shutil.rmtree(args.workdir, ignore_errors=True)
    arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}")
    shape = prepare(args, args.hidden, os.path.join(args.workdir, f"h{args.hidden}"))
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_name()}; python {sys.version.split()[0]}; {_versions()}")
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, {shape['config'].num_attention_heads} heads, "
          f"vocab {shape['config'].vocab_size}; LoRA r 32 alpha 64 on {','.join(LORA_TARGETS)}; micro-batch 4, "
          f"global 8, 2 ranks, {args.steps} steps, fp32; batches padded to "
          f"{min(s for st in shape['steps'] for _, s in st['shapes'])}-"
          f"{max(s for st in shape['steps'] for _, s in st['shapes'])} tokens")
    ceiling_before, per_cpu_before, sizes = gemm_ceiling()
    print(f"fp32 GEMM, 2 processes x 1 thread: " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()) + " GFLOP/s; "
          f"{per_cpu_before:.1f} GFLOP per CPU-second of one thread")
    results, index = [], 0
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}", flush=True)
        for name in arms:
            results.append(run_arm(name, shape, args, index))
            index += 1
    wide = []
    if args.mfu_hidden:
        wide_shape = prepare(args, args.mfu_hidden, os.path.join(args.workdir, f"h{args.mfu_hidden}"))
        print(f"hidden {args.mfu_hidden} ({wide_shape['config'].num_attention_heads} heads), peft-ds LoRA", flush=True)
        wide.append(run_arm("peft-ds LoRA", wide_shape, args, index))
    ceiling_after, per_cpu_after, sizes = gemm_ceiling()
    print(f"fp32 GEMM, 2 processes x 1 thread (after): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items())
          + f" GFLOP/s; {per_cpu_after:.1f} GFLOP per CPU-second of one thread")
    report(results, args)
    ceiling, per_cpu = max(ceiling_before, ceiling_after), max(per_cpu_before, per_cpu_after)
    for label, rows in ((f"hidden {args.hidden}", results), (f"hidden {args.mfu_hidden}", wide)):
        rates = [r["flops_per_s"] for r in rows if "flops_per_s" in r]
        if rates:
            rate, cpu_rate = statistics.median(rates), statistics.median(r["flops_per_cpu_s"] for r in rows
                                                                          if "flops_per_cpu_s" in r)
            print(f"  model-FLOPs use, peft-ds LoRA step, {label}: wall {rate / 1e9:.1f} GFLOP/s / {ceiling:.1f} "
                  f"= {rate / 1e9 / ceiling:.3f}; per CPU-second {cpu_rate / 1e9:.1f} / {per_cpu:.1f} = "
                  f"{cpu_rate / 1e9 / per_cpu:.3f}  (goal >= 0.60: {'met' if cpu_rate / 1e9 / per_cpu >= 0.6 else 'NOT met'})")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"results": results, "wide": wide, "ceiling_gflops": [ceiling_before, ceiling_after],
                   "gflop_per_cpu_second": [per_cpu_before, per_cpu_after]}, f, indent=1)
    print(f"raw results: {os.path.join(args.workdir, 'results.json')}")


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "deepspeed", "peft", "accelerate"))


if __name__ == "__main__":
    main()
