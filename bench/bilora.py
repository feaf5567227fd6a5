"""BiLoRA cost: time of one bi-level global step (T1 lower steps + T2 = 1 upper step with the darts
hypergradient) against T1 LoRA training steps on the same model and batch size, at T1 = 1 and T1 = 5
(goals <= 3x and <= 1.6x); first_order at T1 = 1 for scale. Beside each ratio: the number of
forward+backward passes of a global batch the schedule makes per lower step, its floor.

Both go through the training loop's own step code (`Objective.train_step`, `BilevelObjective.train_step`)
on DeepSpeed ZeRO-3 (1 rank, gloo, CPU), with synthetic records; each variant runs in its own process,
the variants in lockstep, one step of each in turn (bench/common.py `lockstep`), so load on a shared
machine hits all alike; steps timed after 2 warm-up steps, medians.

    python bench/bilora.py [--steps 8] [--hidden 384] [--layers 4] [--vocab 1024] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import add_model_arguments, describe, enlarged_llama_config, lockstep, model_arguments, turns  # noqa: E402

VARIANTS = {"lora": None, "bilora-T1=1": ("darts", 1), "bilora-T1=5": ("darts", 5),
            "bilora-first-order-T1=1": ("first_order", 1)}


def worker(args):
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    import peft_ds
    from peft_ds import bilevel, distributed, ds_config
    from peft_ds.injection import adapter_parameters
    from peft_ds.methods.bilora import split_parameters
    from peft_ds.models import build_from_config
    from peft_ds.objective import Feed, Objective

    rank, world = distributed.init()
    torch.set_num_threads(2)
    ds = ds_config.resolve(ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")), hidden_size=args.hidden,
                           micro_batch_size=args.batch, accumulation=1, world_size=world, dtype="fp32")
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    variant = VARIANTS[args.worker]
    if variant is None:
        spec = peft_ds.PeftSpec(method="lora", r=32, alpha=64)
    else:
        spec = peft_ds.PeftSpec(method="bilora", r=32, alpha=64, hypergradient=variant[0], T1=variant[1], T2=1)
    torch.manual_seed(0)
    config = enlarged_llama_config(args.hidden, args.layers, args.vocab)
    model = peft_ds.apply_peft(build_from_config(config), spec).train()
    params = list(adapter_parameters(model).values())
    if variant is None:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = bilevel.LevelAdamW(*split_parameters(model), lr=1e-4, upper_lr=1e-4,
                                       weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=scheduler, config=ds)
    g = torch.Generator().manual_seed(1)
    records = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 1000, (64, args.seq), generator=g).tolist()]
    feed = Feed(rank=rank, world=world, accumulation=1, micro=args.batch, global_batch=args.batch * world, pad_id=0,
                seed=0, device=engine.device)
    if variant is None:
        objective = Objective()
    else:
        objective = bilevel.BilevelObjective(model, spec, optimizer, scheduler, records[:48], records[48:])
    if args.profile:
        return profile(lambda step: objective.train_step(engine, feed, records, step))
    times = []
    for step in turns(args.steps + 2):
        t0 = time.perf_counter()
        objective.train_step(engine, feed, records, step)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"median": statistics.median(times)}), flush=True)
    torch.distributed.destroy_process_group()


def profile(train_step) -> None:
    """One warm-up step, then one step under cProfile: the time of the schedule's parts (the passes
    through the engine, the optimizer steps and what surrounds them), cumulative."""
    import cProfile
    import pstats

    train_step(0)
    prof = cProfile.Profile()
    prof.runcall(train_step, 1)
    stats = pstats.Stats(prof)
    schedule = r"peft_ds/(bilevel|objective)\.py|engine\.py.*\((forward|backward|step)\)"
    stats.sort_stats("cumulative").print_stats(schedule, 24)


def launch(args, variant):
    """(command, environment) of the variant's one rank."""
    from peft_ds.distributed import free_port

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), *model_arguments(args),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    return cmd, env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to time (lora always)")
    parser.add_argument("--profile", nargs="+", choices=list(VARIANTS),
                        help="instead: profile one step of these variants (cProfile, cumulative times)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        for variant in args.profile:
            cmd, env = launch(args, variant)
            print(f"== {variant}", flush=True)
            subprocess.run(cmd + ["--profile", variant], env=env, check=True)
        return

    config = enlarged_llama_config(args.hidden, args.layers, args.vocab)
    print(f"{describe(config)}, batch {args.batch}x{args.seq}, r=32 on LLaMA's "
          f"default targets, dropout 0.05, fp32, ZeRO-3 (1 rank, gloo, CPU), {args.steps} steps per run, medians")
    med = {}
    timed = ["lora"] + [v for v in args.variants if v != "lora"]
    for variant, (result, error) in lockstep({v: [launch(args, v)] for v in timed}, args.steps + 2).items():
        if error is not None:
            raise SystemExit(f"{variant} failed: {error}")
        med[variant] = result["median"]
        print(f"  {variant:<24} step {med[variant] * 1000:8.1f} ms", flush=True)
    # darts as SPEC 2.5 states it: T1 lower passes + 3 upper passes (D2, then the last D1 batch at
    # V + eps v and V - eps v), each a forward and backward of one global batch: (T1 + 3) / T1 LoRA steps
    for variant, T1, goal in (("bilora-T1=1", 1, 3.0), ("bilora-T1=5", 5, 1.6), ("bilora-first-order-T1=1", 1, None)):
        if variant not in med:
            continue
        ratio = med[variant] / (T1 * med["lora"])
        floor = (T1 + (1 if "first-order" in variant else 3)) / T1
        verdict = "" if goal is None else f"; goal <= {goal}: {'met' if ratio <= goal else 'NOT met'}"
        over = ratio / floor  # issue 15.4: darts <= 1.05 x its floor
        over_goal = "" if goal is None else f" (goal <= 1.05: {'met' if over <= 1.05 else 'NOT met'})"
        print(f"  {variant}: global step / ({T1} x LoRA step) {ratio:.3f}   (passes: {floor:.2f}{verdict})   "
              f"/ passes {over:.3f}{over_goal}")


if __name__ == "__main__":
    main()
