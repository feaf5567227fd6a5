"""Training-step overhead of SIBO and of peft-ds LoRA against Hugging Face PEFT LoRA.

All variants are built on one seeded backbone (tiny-llama enlarged so that a step takes well over
100 ms, or at --hidden 4096 / 5120 the real LLaMA-7B / 13B layer shapes, see bench/common.py), whose
frozen weights they share (one copy in memory), with the same rank, targets and batch; their steps
(forward, backward, AdamW step) are timed round-robin, one step of each variant per round, in reverse
order every other round (so no variant always follows the same one), so drift hits all alike. Prints
medians and the ratios LoRA-SIBO/LoRA, Adapter-SIBO/Adapter (goals <= 1.03, <= 1.01 at a real width)
and peft-ds LoRA / PEFT LoRA: the ratio of the medians, and the median of the per-round ratios of steps
run one after the other with its 95% interval (a goal is shown met when the interval's top is within it).

    python bench/overhead.py [--steps 30] [--hidden 384] [--layers 4] [--vocab 1024] [--batch 4] [--seq 128]
                             [--variants LoRA LoRA-SIBO ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import (REAL_WIDTHS, add_model_arguments, describe, enlarged_llama_config, paired_ratio, print_profile,
                    shared_copy)

import peft_ds
from peft_ds.architectures import ARCHITECTURES
from peft_ds.models import build_from_config


VARIANTS = ("LoRA", "LoRA-SIBO", "Adapter", "Adapter-SIBO", "PEFT LoRA")


def make_variants(args):
    config = enlarged_llama_config(args.hidden, args.layers, args.vocab)
    backbone = build_from_config(config)
    lora = dict(method="lora", r=args.r, alpha=2 * args.r)
    adapter = dict(method="adapter", bottleneck_size=args.bottleneck)
    specs = {
        "LoRA": peft_ds.PeftSpec(**lora),
        "LoRA-SIBO": peft_ds.PeftSpec(**lora, sibo_lambda=0.1),
        "Adapter": peft_ds.PeftSpec(**adapter),
        "Adapter-SIBO": peft_ds.PeftSpec(**adapter, sibo_lambda=0.1),
    }
    variants = {name: peft_ds.apply_peft(shared_copy(backbone), spec) for name, spec in specs.items()
                if name in args.variants}
    if "PEFT LoRA" not in args.variants:
        return config, variants
    from peft import LoraConfig, get_peft_model

    targets = list(ARCHITECTURES["llama"].lora_targets)
    variants["PEFT LoRA"] = get_peft_model(
        shared_copy(backbone),
        LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=targets),
    )
    return config, variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 3 warm-up steps)")
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--bottleneck", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to time (ratios are printed for the pairs present)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: one step of each variant under torch.profiler (self CPU time per operator)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config, variants = make_variants(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=g)
    steps = {}
    for name, model in variants.items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    if args.profile:
        return print_profile(steps, watch=("aten::lerp",))  # SIBO's blend
    times = {name: [] for name in variants}
    order = list(steps.items())
    for round_ in range(args.steps + 3):
        for name, step in order if round_ % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            step()
            if round_ >= 3:
                times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{describe(config)} batch={args.batch}x{args.seq} r={args.r} "
          f"bottleneck={args.bottleneck}, {args.steps} steps each, {args.threads} threads")
    for name, m in med.items():
        print(f"  {name:<13} median step {m * 1000:8.1f} ms")
    sibo_goal = 1.01 if args.hidden in REAL_WIDTHS else 1.03  # issue 15.4 at real width
    pairs = [("LoRA-SIBO / LoRA", "LoRA-SIBO", "LoRA", sibo_goal),
             ("Adapter-SIBO / Adapter", "Adapter-SIBO", "Adapter", sibo_goal),
             ("peft-ds LoRA / PEFT LoRA", "LoRA", "PEFT LoRA", 1.00)]
    print("  ratio                      of medians   per round: median [95% interval]")
    for label, a, b, goal in pairs:
        if a not in times or b not in times:
            continue
        ratio, low, high = paired_ratio(times[a], times[b])
        verdict = "met" if high <= goal else "NOT shown" if ratio <= goal else "NOT met"
        print(f"  {label:<26} {med[a] / med[b]:6.3f}       {ratio:6.3f} [{low:.3f}, {high:.3f}]"
              f"   (goal <= {goal:.2f}: {verdict})")


if __name__ == "__main__":
    main()
