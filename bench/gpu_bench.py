"""The measured stages of bench/gpu_check.sh (see bench/README.md for the whole check).

  mfu      LoRA-SIBO r 32 on q,k,v,up,down, `llama-7b-shape` at full depth (random init), bf16, ZeRO-3 on
           one GPU (ds_configs/zero3_bf16.json), micro-batch x 256 tokens for several micro-batch sizes,
           gradient checkpointing off and on: step time, tokens/s, model-FLOPs utilisation (bench/flops.py)
           against the GPU's dense bf16 peak, peak GPU memory (and `peft-ds plan`'s prediction); then the
           same steps for Hugging Face PEFT LoRA on the same model without DeepSpeed (ratio).
  methods  AdaMix-LoRA and BiLoRA (darts) per optimizer step against LoRA: `peft-ds train` runs at the
           7B width cut to a few layers, step times from metrics.jsonl.
  report   every stage's status and figures -> report.json and report.md.

--dry-run: the same code on the CPU, tiny-llama, fp32 (ds_configs/zero3_cpu.json), small sizes; the MFU
is then set against the measured fp32 GEMM rate of the same threads.

    python bench/gpu_bench.py mfu --json F [--dry-run]
    python bench/gpu_bench.py methods --json F --workdir D [--dry-run]
    python bench/gpu_bench.py report --stages STAGES.jsonl --dir D --out OUTDIR
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from flops import cpu_gemm_ceiling, flops_per_token, gpu_peak_bf16  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()


def shapes(dry: bool) -> dict:
    if dry:
        return dict(preset="tiny-llama", num_layers=2, dtype="fp32", ds="zero3_cpu.json", seq=64, micro=[1, 2],
                    warmup=1, steps=2, method_layers=2, method_steps=3)
    return dict(preset="llama-7b-shape", num_layers=None, dtype="bf16", ds="zero3_bf16.json", seq=256,
                micro=[1, 4, 8], warmup=2, steps=5, method_layers=4, method_steps=8)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _batch(micro: int, seq: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(micro * 7919 + seq)
    ids = torch.randint(3, min(vocab, 1000), (micro, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def _set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.config.use_cache = False


def _time_steps(step, micro, seq, vocab, device, warmup, steps) -> tuple[float, int]:
    """(median seconds per step, peak GPU bytes during the timed steps; 0 on the CPU)."""
    batch = _batch(micro, seq, vocab, device)
    for _ in range(warmup):
        step(batch)
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step(batch)
        _sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times), (torch.cuda.max_memory_allocated() if CUDA else 0)


def write_json(path: str, value) -> None:
    """`value` as JSON at `path`, replaced whole (a stage killed at its time limit leaves the last rows written)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def _grid(step, model, sizes, device, on_row=lambda row: None) -> list[dict]:
    """The step timed at every (gradient checkpointing, micro-batch); `on_row` is called as each row is done."""
    rows = []
    vocab = model.config.vocab_size
    for checkpointing in (False, True):
        _set_checkpointing(model, checkpointing)
        for micro in sizes["micro"]:
            seconds, peak = _time_steps(step, micro, sizes["seq"], vocab, device, sizes["warmup"], sizes["steps"])
            rows.append({"gradient_checkpointing": checkpointing, "micro_batch": micro, "seq": sizes["seq"],
                         "step_s": seconds, "tokens_per_s": micro * sizes["seq"] / seconds, "peak_bytes": peak})
            on_row(rows[-1])
    return rows


def _plan_bytes(sizes: dict, micro: int, checkpointing: bool) -> float:
    """`peft-ds plan`'s per-rank prediction for this step without the CUDA-context allowance (what
    max_memory_allocated can see): the same run config on one rank."""
    from peft_ds.config import load_config
    from peft_ds.plan import plan

    overrides = [f"model.name_or_path={sizes['preset']}", f"model.dtype={sizes['dtype']}", *LORA_SIBO,
                 f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                 f"data.cutoff_len={sizes['seq']}", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                 f"deepspeed={os.path.join(ROOT, 'ds_configs', sizes['ds'])}"]
    if sizes["num_layers"]:
        overrides.append(f"model.num_layers={sizes['num_layers']}")
    return plan(load_config(None, overrides), 1, 1)["non_cuda_total"]


LORA_SIBO = ["method.method=lora", "method.r=32", "method.alpha=64", "method.sibo_lambda=0.1"]


def peft_ds_rows(sizes: dict, on_info, on_row) -> list[dict]:
    """LoRA-SIBO under ZeRO-3 on one rank, the engine peft-ds train builds; `on_info` gets the build's figures
    before the grid, `on_row` each row as it is done (with the plan's prediction)."""
    import deepspeed

    from peft_ds import distributed, ds_config, models
    from peft_ds.config import load_config
    from peft_ds.injection import apply_peft
    from peft_ds.train import make_optimizer

    distributed.init()  # importing peft_ds named DeepSpeed's CPU accelerator where there is no CUDA
    config = load_config(None, [*LORA_SIBO, "train.warmup_steps=0", "train.max_steps=1000"])
    raw = ds_config.load(os.path.join(ROOT, "ds_configs", sizes["ds"]))
    resolved = ds_config.resolve(raw, hidden_size=models.hidden_size_of(sizes["preset"]), micro_batch_size=1,
                                 accumulation=1, world_size=1, dtype=sizes["dtype"])
    began = time.perf_counter()
    model = models.build_model(sizes["preset"], dtype=ds_config.DTYPES[sizes["dtype"]], ds_config=resolved,
                               num_layers=sizes["num_layers"])
    apply_peft(model, config.method)
    build_s = time.perf_counter() - began
    trainable, optimizer, scheduler = make_optimizer(model, config.method, config.train, 1000)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=trainable, config=resolved)
    engine.train()

    def step(batch):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    on_info({"build_s": build_s, "flops_per_token": flops_per_token(model, sizes["seq"]), "parameters": sum(
        int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in model.parameters()),
        "config": {"preset": sizes["preset"], "num_layers": model.config.num_hidden_layers, "dtype": sizes["dtype"],
                   "deepspeed": sizes["ds"], "method": config.method.to_dict()}})

    def with_plan(row):
        row["plan_bytes"] = _plan_bytes(sizes, row["micro_batch"], row["gradient_checkpointing"])
        on_row(row)

    return _grid(step, model, sizes, engine.device, with_plan)


def hf_peft_rows(sizes: dict, on_row) -> list[dict]:
    """HF PEFT LoRA r 32 / alpha 64 on q,k,v,up,down on the same architecture and dtype, no DeepSpeed
    (transformers' own random init: the values do not change the work)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_ds import ds_config, models
    from peft_ds.architectures import ARCHITECTURES

    device = torch.device("cuda" if CUDA else "cpu")
    before = torch.cuda.memory_allocated() if CUDA else 0
    with device:
        model = AutoModelForCausalLM.from_config(models.preset_config(sizes["preset"], sizes["num_layers"]),
                                                 dtype=ds_config.DTYPES[sizes["dtype"]])
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                                             target_modules=list(ARCHITECTURES["llama"].lora_targets)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def relative(row):
        row["peak_bytes"] = max(0, row["peak_bytes"] - before)
        on_row(row)

    rows = _grid(step, model.base_model.model, sizes, device, relative)
    del model, optimizer
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return rows


def cmd_mfu(args) -> int:
    sizes = shapes(args.dry_run)
    if CUDA:
        device_name, peak = gpu_peak_bf16()
        peak_source = "datasheet dense bf16"
    else:
        device_name, peak, peak_source = "cpu", cpu_gemm_ceiling(), "measured fp32 GEMM 2048^3, same threads"
    result = {"device": device_name, "peak_flops": peak, "peak_source": peak_source, "torch": torch.__version__,
              "dry_run": args.dry_run, "hf_peft_rows": [], "rows": []}
    write_json(args.json, result)

    def theirs_done(row):
        result["hf_peft_rows"].append(row)
        write_json(args.json, result)

    def info_done(info):
        result.update(info)
        write_json(args.json, result)

    def ours_done(mine):
        other = result["hf_peft_rows"][len(result["rows"])]
        mine["mfu"] = None if peak is None else result["flops_per_token"]["total"] * mine["tokens_per_s"] / peak
        mine["hf_peft_step_s"] = other["step_s"]
        mine["hf_peft_peak_bytes"] = other["peak_bytes"]
        mine["step_ratio_vs_hf_peft"] = mine["step_s"] / other["step_s"]
        result["rows"].append(mine)
        write_json(args.json, result)

    hf_peft_rows(sizes, theirs_done)  # first: later, ZeRO-3's HfDeepSpeedConfig would partition its model too
    peft_ds_rows(sizes, info_done, ours_done)
    for row in result["rows"]:
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"gc={row['gradient_checkpointing']!s:5} micro={row['micro_batch']:2d}: {row['step_s'] * 1e3:8.1f} ms "
              f"{row['tokens_per_s']:9.0f} tok/s  MFU {mfu}  peak {row['peak_bytes'] / 2**30:.1f} GiB  "
              f"vs HF PEFT {row['step_ratio_vs_hf_peft']:.2f}x")
    return 0


METHODS = {"lora": ["method.method=lora", "method.r=32", "method.alpha=64"],
           "adamix_lora": ["method.method=adamix_lora", "method.r=32", "method.alpha=64"],
           "bilora": ["method.method=bilora", "method.r=32", "method.alpha=64", "method.hypergradient=darts"]}


def cmd_methods(args) -> int:
    """Each method through `peft-ds train`'s own loop (peft_ds.train.train on the demo run config), one after
    another in this one process (world size 1: the imports and CUDA's start paid once), median step time;
    the JSON is written as each method ends."""
    import traceback

    from peft_ds import distributed
    from peft_ds.config import load_config
    from peft_ds.train import train

    sizes = shapes(args.dry_run)
    result = {"dry_run": args.dry_run, "num_layers": sizes["method_layers"], "methods": {}}
    write_json(args.json, result)
    base = [f"model.name_or_path={'tiny-llama' if args.dry_run else 'llama-7b-shape'}",
            f"model.num_layers={sizes['method_layers']}", f"model.dtype={sizes['dtype']}",
            f"deepspeed={os.path.join(ROOT, 'ds_configs', sizes['ds'])}", "method.sibo_lambda=0.0",
            "data.cutoff_len=256", "data.val_set_size=0", "train.micro_batch_size=4", "train.global_batch_size=4",
            f"train.max_steps={sizes['method_steps']}", "train.save_every=0", "train.eval_every=0",
            "train.resume=false"]
    for name, overrides in METHODS.items():
        out = os.path.join(args.workdir, name)
        try:
            train(load_config(os.path.join(ROOT, "configs", "demo_tiny_llama_lora_sibo.yaml"),
                              [*base, *overrides, f"output_dir={out}"]))
        except Exception as e:  # the next method still runs; the error is the stage's report
            traceback.print_exc()
            result["methods"][name] = {"error": [f"{type(e).__name__}: {e}"[:300]]}
            write_json(args.json, result)
            continue
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [row["step_s"] for row in map(json.loads, f) if "step_s" in row][2:]
        row = result["methods"][name] = {"median_step_s": statistics.median(steps), "steps_timed": len(steps)}
        lora = result["methods"].get("lora", {}).get("median_step_s")
        if lora:
            row["ratio_to_lora"] = row["median_step_s"] / lora
            print(f"{name:12s} {row['median_step_s'] * 1e3:9.1f} ms/step  {row['ratio_to_lora']:.2f}x LoRA", flush=True)
        write_json(args.json, result)
    distributed.shutdown()
    return 0 if all("median_step_s" in r for r in result["methods"].values()) else 1


def _gib(value) -> str:
    return "n/a" if not value else f"{value / 2**30:.1f}"


def cmd_report(args) -> int:
    with open(args.stages) as f:
        stages = [json.loads(line) for line in f if line.strip()]
    report = {"stages": stages}
    for name in ("mfu", "methods"):
        path = os.path.join(args.dir, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                report[name] = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# peft-ds GPU check", "", "| stage | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit']} |" for s in stages]
    mfu = report.get("mfu")
    if mfu and not mfu.get("rows"):
        lines += ["", f"mfu: {len(mfu.get('hf_peft_rows', []))} HF PEFT row(s) and no peft-ds row before the stage "
                  f"ended (report.json holds them)"]
    if mfu and mfu.get("rows"):
        lines += ["", f"LoRA-SIBO r 32, {mfu['config']['preset']} ({mfu['config']['num_layers']} layers), "
                  f"{mfu['config']['dtype']}, ZeRO-3 on one rank; device {mfu['device']}, torch {mfu['torch']}; "
                  f"peak {mfu['peak_flops'] or 0:.3g} FLOP/s ({mfu['peak_source']}); model FLOPs per token "
                  f"{mfu['flops_per_token']['total']:.4g} (bench/flops.py)", "",
                  "| GC | micro x seq | step ms | tokens/s | MFU | peak GiB | plan GiB | HF PEFT step ms | ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mfu["rows"]:
            use = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['micro_batch']} x {r['seq']} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {use} | {_gib(r['peak_bytes'])} | "
                         f"{_gib(r.get('plan_bytes'))} | {r['hf_peft_step_s'] * 1e3:.1f} | "
                         f"{r['step_ratio_vs_hf_peft']:.2f} |")
    methods = report.get("methods")
    if methods:
        lines += ["", f"Per optimizer step against LoRA ({methods['num_layers']} layers, `peft-ds train`):", "",
                  "| method | ms/step | ratio |", "|---|---|---|"]
        for name, row in methods["methods"].items():
            if "median_step_s" in row:
                lines.append(f"| {name} | {row['median_step_s'] * 1e3:.1f} | {row.get('ratio_to_lora', 0):.2f} |")
            else:
                lines.append(f"| {name} | failed: {' '.join(row['error'])} | |")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("mfu", "methods"):
        p = sub.add_parser(name)
        p.add_argument("--json", required=True, help="where this stage's figures go")
        p.add_argument("--dry-run", action="store_true", help="CPU, tiny-llama, fp32, small sizes")
        if name == "methods":
            p.add_argument("--workdir", required=True, help="where the runs' output directories go")
    p = sub.add_parser("report")
    p.add_argument("--stages", required=True, help="one JSON line per stage (bench/gpu_check.sh writes it)")
    p.add_argument("--dir", required=True, help="where the stages wrote their JSON")
    p.add_argument("--out", required=True, help="where report.json and report.md go")
    args = parser.parse_args()
    return {"mfu": cmd_mfu, "methods": cmd_methods, "report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
