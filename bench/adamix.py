"""AdaMix cost: training-step time of AdaMix-LoRA (with consistency regularisation) against LoRA,
on 1 rank and 2 ranks under DeepSpeed ZeRO-3, with the two views as ONE forward of the doubled batch
(peft-ds) and as two sequential forwards (the reference code's way); LoRA on the doubled batch, the
backbone work the two views cannot avoid (so AdaMix one pass / LoRA on the doubled batch is AdaMix's
own cost); and inference time of a merged AdaMix-LoRA against plain LoRA (goal <= 1.02).

Each (world size, variant) runs in its own processes (a variant may crash DeepSpeed); the variants of a
world size run in lockstep, one step of each in turn (bench/common.py `lockstep`), so load on a shared
machine hits all alike; steps are timed after 3 warm-up steps, medians. Inference: one process,
forwards timed round-robin, medians.

    python bench/adamix.py [--steps 15] [--hidden 384] [--layers 4] [--vocab 1024] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import (add_model_arguments, describe, enlarged_llama_config, lockstep, model_arguments,  # noqa: E402
                    print_profile, shared_copy, turns)


VARIANTS = ("lora", "adamix", "adamix-two-pass", "lora-doubled")
PLAIN_LORA = ("lora", "lora-doubled")


def model_config(args):
    return enlarged_llama_config(args.hidden, args.layers, args.vocab)


def spec(variant):
    import peft_ds

    if variant in PLAIN_LORA:
        return peft_ds.PeftSpec(method="lora", r=8, alpha=16)
    return peft_ds.PeftSpec(method="adamix_lora", r=8, alpha=16, num_experts=4, consistency_weight=1.0)


def worker(args):
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    import peft_ds
    from peft_ds import distributed, ds_config
    from peft_ds.injection import adapter_parameters
    from peft_ds.methods.adamix import consistency_loss
    from peft_ds.models import build_from_config

    rank, world = distributed.init()
    ds = ds_config.resolve(ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")), hidden_size=args.hidden,
                           micro_batch_size=args.batch, accumulation=1, world_size=world, dtype="fp32")
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    torch.manual_seed(0)
    model = peft_ds.apply_peft(build_from_config(model_config(args)), spec(args.variant)).train()
    params = list(adapter_parameters(model).values())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch.optim.AdamW(params, lr=1e-4), config=ds)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    if args.variant == "lora-doubled":  # the backbone work of AdaMix's two views: the batch twice
        ids = torch.cat([ids, ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    router = getattr(model, "adamix_router", None)
    if router is not None:
        router.auto = False
    times = []
    for step in turns(args.steps + 3):
        t0 = time.perf_counter()
        if router is not None:
            router.draw()
        if args.variant in PLAIN_LORA:
            loss = engine(**batch).loss
        else:
            loss = consistency_loss(engine, batch, 1.0, one_pass=args.variant == "adamix")
        engine.backward(loss)
        engine.step()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"median": statistics.median(times)}), flush=True)
    torch.distributed.destroy_process_group()


def launches(args, variant, nproc):
    """(command, environment) of each rank of one variant's run."""
    from peft_ds.distributed import free_port

    port, out = str(free_port()), []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
        cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), *model_arguments(args),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        out.append((cmd, env))
    return out


def inference(args):
    import torch

    import peft_ds
    from peft_ds.methods.adamix import merge
    from peft_ds.models import build_from_config

    torch.set_num_threads(2)
    backbone = build_from_config(model_config(args))  # one copy of the frozen weights for both
    models = {"LoRA": peft_ds.apply_peft(shared_copy(backbone), spec("lora")).eval(),
              "merged AdaMix-LoRA": merge(peft_ds.apply_peft(shared_copy(backbone), spec("adamix"))).eval()}
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(args.steps * 2 + 3):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=ids)
                if round_ >= 3:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(args):
    """Where a training step's time goes, LoRA against AdaMix one pass (plain PyTorch, one process,
    the backbone's weights shared): self CPU time of the top operators of one profiled step each."""
    import torch

    import peft_ds
    from peft_ds.methods.adamix import consistency_loss
    from peft_ds.models import build_from_config

    torch.set_num_threads(2)
    backbone = build_from_config(model_config(args))
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = {}
    for variant in ("lora", "adamix"):
        model = peft_ds.apply_peft(shared_copy(backbone), spec(variant)).train()
        loss = (lambda m=model: m(**batch).loss) if variant == "lora" else (
            lambda m=model: consistency_loss(m, batch, 1.0, one_pass=True))
        steps[variant] = lambda loss=loss: loss().backward()
    print_profile(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to time (lora always)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--profile", action="store_true",
                        help="instead: one plain-PyTorch step of LoRA and of AdaMix one pass under torch.profiler")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)
    if args.profile:
        return profile(args)

    print(f"{describe(model_config(args))}, batch {args.batch}x{args.seq}, LoRA r=8, "
          f"AdaMix-LoRA 4 experts of A (shared B), consistency weight 1, fp32, ZeRO-3 (gloo, CPU), "
          f"{args.steps} steps per run, medians")
    variants = ["lora"] + [v for v in args.variants if v != "lora"]
    for world in args.worlds:
        med = dict.fromkeys(VARIANTS)
        results = lockstep({variant: launches(args, variant, world) for variant in variants}, args.steps + 3)
        for variant in variants:
            result, error = results[variant]
            med[variant] = result and result["median"]
            shown = f"{med[variant] * 1000:8.1f} ms" if med[variant] else f"FAILED: {error}"
            print(f"  {world} rank(s)  {variant:<16} step {shown}")
        if med["lora"] and med["adamix"]:
            ratio = med["adamix"] / med["lora"]  # issue 15.4: <= 1.8
            print(f"  {world} rank(s)  AdaMix (one pass) / LoRA        {ratio:.3f}   "
                  f"(goal <= 1.8: {'met' if ratio <= 1.8 else 'NOT met'})")
        if med["adamix"] and med["lora-doubled"]:
            print(f"  {world} rank(s)  AdaMix (one pass) / LoRA on the doubled batch  "
                  f"{med['adamix'] / med['lora-doubled']:.3f}   (LoRA doubled / LoRA "
                  f"{med['lora-doubled'] / med['lora']:.3f}: the two views' backbone floor)")
        if med["adamix"] and med["adamix-two-pass"]:
            print(f"  {world} rank(s)  AdaMix two passes / one pass    {med['adamix-two-pass'] / med['adamix']:.3f}")
    inf = inference(args)
    ratio = inf["merged AdaMix-LoRA"] / inf["LoRA"]
    print(f"  inference: LoRA {inf['LoRA'] * 1000:.1f} ms, merged AdaMix-LoRA {inf['merged AdaMix-LoRA'] * 1000:.1f} ms,"
          f" ratio {ratio:.3f} (goal <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})")


if __name__ == "__main__":
    main()
