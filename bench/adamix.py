"""AdaMix cost: training-step time of AdaMix-LoRA (with consistency regularisation) against LoRA,
on 1 rank and 2 ranks under DeepSpeed ZeRO-3, with the two views as ONE forward of the doubled batch
(peft-ds) and as two sequential forwards (the reference code's way); and inference time of a merged
AdaMix-LoRA against plain LoRA (goal <= 1.02).

Each (world size, variant) runs in its own launch (a variant may crash DeepSpeed); steps are timed
after 3 warm-up steps, medians. Inference: one process, forwards timed round-robin, medians.

    python bench/adamix.py [--steps 15] [--hidden 384] [--layers 4] [--batch 4] [--seq 128]
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

from common import enlarged_llama_config  # noqa: E402


def model_config(args):
    return enlarged_llama_config(args.hidden, args.layers)


def spec(variant):
    import peft_ds

    if variant == "lora":
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
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    router = getattr(model, "adamix_router", None)
    if router is not None:
        router.auto = False
    times = []
    for step in range(args.steps + 3):
        t0 = time.perf_counter()
        if router is not None:
            router.draw()
        if args.variant == "lora":
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


def launch(args, variant, nproc):
    from peft_ds.distributed import _free_port

    port, procs = str(_free_port()), []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
        cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    result, error = None, None
    for p in procs:
        try:
            out, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = "", "timed out (hung)"
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)["median"]
        if p.returncode != 0 and error is None:
            lines = [l for l in err.splitlines() if "Error" in l or "error" in l]
            error = (lines[-1] if lines else f"exit {p.returncode}").strip()[:160]
    return result, error


def inference(args):
    import torch

    import peft_ds
    from peft_ds.methods.adamix import merge
    from peft_ds.models import build_from_config

    torch.set_num_threads(2)
    models = {"LoRA": peft_ds.apply_peft(build_from_config(model_config(args)), spec("lora")).eval(),
              "merged AdaMix-LoRA": merge(peft_ds.apply_peft(build_from_config(model_config(args)),
                                                             spec("adamix"))).eval()}
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", choices=["lora", "adamix", "adamix-two-pass"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)

    print(f"tiny-llama hidden={args.hidden} layers={args.layers}, batch {args.batch}x{args.seq}, LoRA r=8, "
          f"AdaMix-LoRA 4 experts of A (shared B), consistency weight 1, fp32, ZeRO-3 (gloo, CPU), "
          f"{args.steps} steps per run, medians")
    for world in (1, 2):
        med = {}
        for variant in ("lora", "adamix", "adamix-two-pass"):
            med[variant], error = launch(args, variant, world)
            shown = f"{med[variant] * 1000:8.1f} ms" if med[variant] else f"FAILED: {error}"
            print(f"  {world} rank(s)  {variant:<16} step {shown}")
        if med["lora"] and med["adamix"]:
            print(f"  {world} rank(s)  AdaMix (one pass) / LoRA        {med['adamix'] / med['lora']:.3f}")
        if med["adamix"] and med["adamix-two-pass"]:
            print(f"  {world} rank(s)  AdaMix two passes / one pass    {med['adamix-two-pass'] / med['adamix']:.3f}")
    inf = inference(args)
    ratio = inf["merged AdaMix-LoRA"] / inf["LoRA"]
    print(f"  inference: LoRA {inf['LoRA'] * 1000:.1f} ms, merged AdaMix-LoRA {inf['merged AdaMix-LoRA'] * 1000:.1f} ms,"
          f" ratio {ratio:.3f} (goal <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})")


if __name__ == "__main__":
    main()
