"""Tokens/s of a DeepSpeed ZeRO-3 training step against a plain PyTorch step of the same model.

One process, one rank: tiny-llama enlarged (default hidden 512, 4 layers) with LoRA-SIBO, the same
batch for both; steps (forward, backward, AdamW step over the adapter) timed round-robin, medians.
Goal: ZeRO-3 single-rank step time <= 1.3x plain. Both arms share one process and its malloc settings
(as training leaves them after the build): a cost of the whole run's process set-up shows only in
bench/vs_trainer.py, which launches peft-ds and the Trainer stack as users do.

    python bench/step.py [--steps 20] [--hidden 512] [--layers 4] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from common import enlarged_llama_config

warnings.filterwarnings("ignore", category=FutureWarning)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import deepspeed

    import peft_ds
    from peft_ds import distributed, ds_config
    from peft_ds.injection import adapter_parameters
    from peft_ds.models import build_from_config, zero3_build_memory

    distributed.init()
    config = enlarged_llama_config(args.hidden, args.layers)
    spec = peft_ds.PeftSpec(method="lora", r=32, alpha=64, sibo_lambda=0.1, dropout=0.0)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    # plain PyTorch first: once a ZeRO-3 HfDeepSpeedConfig is alive, transformers partitions every build
    plain = peft_ds.apply_peft(build_from_config(config), spec).train()
    plain_opt = torch.optim.AdamW(list(adapter_parameters(plain).values()), lr=1e-4)

    ds = ds_config.resolve(ds_config.load("ds_configs/zero3_cpu.json"), hidden_size=args.hidden, micro_batch_size=args.batch,
                           accumulation=1, world_size=1, dtype="fp32")
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds)  # noqa: F841 (must stay alive while the model is built)
    with zero3_build_memory():  # glibc malloc as models.build_model leaves it for training (both arms after it)
        zero_backbone = build_from_config(config)
    zero_model = peft_ds.apply_peft(zero_backbone, spec).train()
    params = list(adapter_parameters(zero_model).values())
    engine, *_ = deepspeed.initialize(model=zero_model, model_parameters=params,
                                      optimizer=torch.optim.AdamW(params, lr=1e-4), config=ds)

    def plain_step():
        loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def zero_step():
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    times = {"plain PyTorch": [], "ZeRO-3 (1 rank)": []}
    for round_ in range(args.steps + 2):
        for name, step in (("plain PyTorch", plain_step), ("ZeRO-3 (1 rank)", zero_step)):
            t0 = time.perf_counter()
            step()
            if round_ >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"tiny-llama hidden={args.hidden} layers={args.layers}, LoRA-SIBO r=32, batch {args.batch}x{args.seq}, "
          f"{args.steps} steps each, fp32, {args.threads} threads")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, m in med.items():
        print(f"  {name:<16} median step {m * 1000:8.1f} ms   {tokens / m:9.0f} tokens/s")
    ratio = med["ZeRO-3 (1 rank)"] / med["plain PyTorch"]
    print(f"  ZeRO-3 / plain step time {ratio:.3f}   (goal <= 1.30: {'met' if ratio <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
