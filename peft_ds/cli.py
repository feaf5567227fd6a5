"""`peft-ds` command line (also `python -m peft_ds`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PeftDsError

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "assets", "math_sample.json")


def _similarity_table(curves: dict) -> str:
    labels = list(curves)
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'layer':>5}  " + "  ".join(f"{label:>{width}}" for label in labels)]
    for layer in range(len(next(iter(curves.values())))):
        lines.append(f"{layer:>5}  " + "  ".join(f"{curves[label][layer]:>{width}.4f}" for label in labels))
    return "\n".join(lines)


SMOOTHNESS_FILES = ("smoothness.json", "smoothness.png")


def _check_smoothness_out(out_dir: str, force: bool, data: str, models=(), adapters=()) -> None:
    """Neither output file is an input (the data file) or lies inside a model or adapter directory read;
    existing ones need --force."""
    from .outputs import check_apart

    inputs = [("the data file", data)] + [("the model directory", m) for m in models if os.path.isdir(m)]
    inputs += [("the adapter directory", a) for a in adapters]
    for name in SMOOTHNESS_FILES:
        check_apart(os.path.join(out_dir, name), "--out", inputs)
    existing = [n for n in SMOOTHNESS_FILES if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise PeftDsError(f"{os.path.join(out_dir, existing[0])} exists (use --force to overwrite)")


def _write_smoothness(curves: dict, out_dir: str) -> tuple[str, str]:
    from . import outputs
    from .diagnostics import plot_similarity

    json_path, png_path = (os.path.join(out_dir, name) for name in SMOOTHNESS_FILES)
    outputs.write_text(json_path, json.dumps({"metric": "mean token-wise cosine similarity (SIBO Eq. 3)",
                                              "layer_0": "token embedding", "curves": curves}, indent=2))
    with outputs.replace_file(png_path) as temp:
        plot_similarity(curves, temp)
    return json_path, png_path


def cmd_demo(args) -> int:
    from .data import prompt_batch, read_records
    from .diagnostics import token_similarity
    from .injection import apply_peft, format_report, trainable_report
    from .models import load_model
    from .spec import PeftSpec

    spec = PeftSpec(method="lora", sibo_lambda=args.sibo_lambda).validate()
    _check_smoothness_out(args.out, args.force, args.data, [args.model])
    records = read_records(args.data)[: args.num_examples]
    model, tokenizer = load_model(args.model)
    batch = prompt_batch(tokenizer, records, args.cutoff_len)
    curves = {f"{args.model} (base)": token_similarity(model, batch)}
    apply_peft(model, spec)
    print(f"LoRA-SIBO (r={spec.r}, alpha={spec.alpha:g}, lambda={spec.sibo_lambda:g}) on {args.model}:")
    print(format_report(trainable_report(model)))
    curves[f"{args.model} + LoRA-SIBO"] = token_similarity(model, batch)
    print(f"\nOver-smoothing on {len(records)} prompts of {os.path.basename(args.data)} "
          "(LoRA-SIBO at init equals the base model: B = 0):")
    print(_similarity_table(curves))
    json_path, png_path = _write_smoothness(curves, args.out)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def cmd_preset(args) -> int:
    from .models import write_preset

    out = write_preset(args.name, args.dir, force=args.force, num_layers=args.num_layers)
    depth = f" ({args.num_layers} layers)" if args.num_layers else ""
    print(f"wrote preset {args.name}{depth} to {out}")
    return 0


def cmd_smoothness(args) -> int:
    from .adapter_io import load_adapter, preset_depth, read_adapter_config
    from .data import prompt_batch, read_records
    from .diagnostics import token_similarity
    from .models import load_model

    if not args.model and not args.adapter:
        raise PeftDsError("give at least one --model or --adapter")
    adapters = [(d, read_adapter_config(d)) for d in args.adapter]
    for adapter_dir, config in adapters:
        if not config.get("base_model") and len(args.model) != 1:
            raise PeftDsError(f"adapter {adapter_dir} names no base model; give exactly one --model")
    _check_smoothness_out(args.out, args.force, args.data, args.model, args.adapter)
    records = read_records(args.data)[: args.num_examples]
    curves = {}
    for name in args.model:
        model, tokenizer = load_model(name, num_layers=args.num_layers)
        curves[name] = token_similarity(model, prompt_batch(tokenizer, records, args.cutoff_len))
    for adapter_dir, config in adapters:
        base = config.get("base_model") or args.model[0]
        model, tokenizer = load_model(base, num_layers=preset_depth(config, base, args.num_layers))
        load_adapter(model, adapter_dir)
        run_name = os.path.basename(os.path.dirname(os.path.abspath(adapter_dir)))
        curves[f"{base} + {run_name}"] = token_similarity(model, prompt_batch(tokenizer, records, args.cutoff_len))
    print(_similarity_table(curves))
    json_path, png_path = _write_smoothness(curves, args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _load_run_config(args):
    from .config import load_config

    overrides = list(args.set)
    if args.resume:
        overrides.append("train.resume=true")
    return load_config(args.config, overrides)


def _warm_up(config) -> None:
    """A rank's slow imports (DeepSpeed, the model's class, the lr schedules, datasets unless the launcher hands
    over the tokenized sets), done while its launcher checks;
    among them the module that deepspeed.initialize imports to check a ZeRO optimizer (DeepSpeed's Muon,
    whose torch.compile set-up costs more than importing DeepSpeed itself)."""
    import deepspeed  # noqa: F401

    from .local_launcher import HANDOFF_VARIABLE

    if HANDOFF_VARIABLE not in os.environ:  # handed the tokenized sets, a rank of --nproc needs no `datasets`
        import datasets  # noqa: F401

    from .models import build_skeleton

    build_skeleton(config.model.name_or_path, config.model.num_layers)
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import transformers.optimization  # noqa: F401  (the lr schedules: make_optimizer)


def cmd_train(args) -> int:
    from . import train

    config = _load_run_config(args)
    if args.nproc and "RANK" not in os.environ:
        # Check everything here, once, before any rank trains (the ranks import meanwhile: run_local).
        import tempfile

        from .distributed import run_local
        from .local_launcher import HANDOFF_PREFIX, HANDOFF_VARIABLE, remove_handoff

        argv = ["train", args.config] + [x for item in args.set for x in ("--set", item)]
        # the ranks take the checked, tokenized inputs from here (train.save_prepared)
        os.environ[HANDOFF_VARIABLE] = handoff = tempfile.mkdtemp(prefix=HANDOFF_PREFIX)
        try:
            return run_local(args.nproc, argv + (["--resume"] if args.resume else []), train.EXIT_PREEMPTED,
                             check=lambda: train.save_prepared(train.prepare(config, args.nproc), handoff))
        finally:  # reached only without the exec (a failed check, or called from Python): nothing is left behind
            remove_handoff(handoff)
            os.environ.pop(HANDOFF_VARIABLE, None)
    from .distributed import shutdown, wait_at_gate

    wait_at_gate(lambda: _warm_up(config))

    try:
        train.train(config)
    except train.Preempted:
        shutdown()  # every rank stopped at the same step
        if os.environ.get("RANK", "0") == "0":
            print("peft-ds: stopped on a signal after saving a checkpoint; resume with --resume", file=sys.stderr)
        return train.EXIT_PREEMPTED
    shutdown()  # not on an error: a peer may be gone, and the launcher ends the job anyway
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_summary, rows_path

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    report = evaluate(args.base, datasets, args.data_dir, adapter=args.adapter, batch_size=args.batch_size,
                      num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, extractor=args.extractor,
                      out=args.out, limit=args.limit, deepspeed_config=args.deepspeed, force=args.force,
                      progress=not args.quiet, num_layers=args.num_layers, dtype=args.dtype)
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.base}{' + ' + args.adapter if args.adapter else ''}: accuracy (%), extractor "
              f"{args.extractor} (the other beside it), {report['world_size']} rank(s)")
        print(format_summary(report))
        if args.out:
            print(f"wrote {args.out} and {rows_path(args.out)}")
    return 0


def cmd_check(args) -> int:
    from . import train

    config = _load_run_config(args)
    run = train.prepare(config, args.world_size)
    t = config.train
    print(f"peft-ds check: {args.config} can start on {args.world_size} rank(s): micro-batch {t.micro_batch_size} x "
          f"accumulation {run['accumulation']} x {args.world_size} = global batch {t.global_batch_size}, "
          f"{run['total']} steps, {len(run['train_set'])} training records, resume {run['resume']}")
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, plan_run, world_from

    config = _load_run_config(args)
    world, per_node = world_from(args.world_size, args.nodes, args.gpus_per_node)
    if not args.gpu_memory > 0:
        raise PeftDsError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory:g}")
    if args.host_memory is not None and not args.host_memory > 0:
        raise PeftDsError(f"--host-memory must be > 0 GiB, got {args.host_memory:g}")
    result = plan_run(config, world, per_node, args.gpu_memory, backend=args.backend, host_memory_gib=args.host_memory)
    print(json.dumps(result, indent=2) if args.json else format_plan(result), flush=True)
    load = result["host_at_load"]
    if args.require_fit and load["fits"] is False:
        raise PeftDsError(f"{args.config} does not fit the host while the backbone loads: {load['node0_total'] / 2**30:.1f} "
                          f"GiB on the node of rank 0 > --host-memory {args.host_memory:g} GiB (launcher/launch.sh "
                          f"skips this check with PEFT_DS_SKIP_PLAN=1)")
    if args.require_fit and not result["fits"]:
        offload = result["with_offload"]
        raise PeftDsError(f"{args.config} does not fit: {result['total'] / 2**30:.1f} GiB per rank > --gpu-memory "
                          f"{args.gpu_memory:g} GiB (largest micro-batch that fits: {result['largest_micro_batch']}; "
                          f"with {offload['deepspeed']}: {offload['total'] / 2**30:.1f} GiB; launcher/launch.sh "
                          f"skips this check with PEFT_DS_SKIP_PLAN=1)")
    return 0


def cmd_consolidate(args) -> int:
    from .consolidate import consolidate

    summary = consolidate(args.checkpoint_dir, args.out, tag=args.tag, fmt=args.format,
                          merge_into_base=args.merge_into_base, dtype=args.dtype, keep_experts=args.keep_experts,
                          fold=args.fold, force=args.force, progress=not args.quiet)
    notes = "".join(f"; {n}" for n in summary["notes"])
    skipped = "; frozen backbone fragments left unread" if summary["frozen_fragments_skipped"] else ""
    print(f"consolidated {summary['tensors']} tensors, {summary['bytes'] / 2**20:.2f} MiB ({args.dtype}) from "
          f"{summary['tag']} of {summary['world_size']} rank(s) in {summary['seconds']:.2f} s -> {summary['out']} "
          f"({summary['format']}, {summary['method']}{notes}{skipped})")
    return 0


def _run_config_arguments(p, resume_help: str) -> None:
    """CONFIG, --set and --resume: how train, check and plan read a run config (`_load_run_config`)."""
    p.add_argument("config", help="run config YAML (e.g. configs/demo_tiny_llama_lora_sibo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.lr=1e-4")
    p.add_argument("--resume", action="store_true", help=resume_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ds", description=__doc__.split("\n")[0] + " "
                                     "Parameter-efficient adapters on frozen LLaMA / GPT-J under DeepSpeed ZeRO-3.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="apply LoRA-SIBO to a tiny model; print the parameter report and over-smoothing",
                       description="Inject LoRA-SIBO (r 32, alpha 64) into a model without training it, print which "
                       "modules it adapted and how many parameters train, and the token-wise cosine similarity per "
                       "layer (SIBO Eq. 3) of the base model and of the adapted one (equal at init: B = 0), as a "
                       "table and as smoothness.json / smoothness.png. `make demo` trains instead (peft-ds train).")
    p.add_argument("--model", default="tiny-llama", help="preset name or local HF model directory (default tiny-llama)")
    p.add_argument("--sibo-lambda", type=float, default=0.1, help="SIBO lambda in [0, 1) (default 0.1)")
    p.add_argument("--data", default=DEFAULT_DATA, help="LLM-Adapters JSON file (default: shipped math sample)")
    p.add_argument("--num-examples", type=int, default=16, help="prompts from --data to measure on (default 16)")
    p.add_argument("--cutoff-len", type=int, default=256, help="tokens per prompt at most (default 256)")
    p.add_argument("--out", default="runs/demo", help="where smoothness.json/png go (default runs/demo)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="fine-tune adapters on a frozen backbone under DeepSpeed ZeRO-3",
                       description="Train with a YAML run config (see configs/). Under torchrun, the deepspeed "
                       "launcher or launcher/, every rank runs this; --nproc N starts N local ranks itself.",
                       epilog="BiLoRA: method.hypergradient = darts (default), first_order or exact. "
                       "method.darts_xi is DARTS's virtual step xi in darts' E.grad = g + xi (g- - g+)/(2 eps): "
                       "1 (default) is Betty's darts, as the authors' code runs it; train.lr gives DARTS's "
                       "second-order approximation, the hypergradient through one unrolled lower step, whose "
                       "implicit term is lr times the default's (README, BiLoRA).")
    _run_config_arguments(p, "continue from the newest complete checkpoint")
    p.add_argument("--nproc", type=int, default=0, help="start this many local ranks itself, as torchrun would "
                   "(default 0: this process is one rank of a launcher's: torchrun, srun, deepspeed, mpirun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy on the LLM-Adapters math / commonsense test sets",
                       description="Generate answers for <data-dir>/<name>/test.json with the LLM-Adapters evaluation "
                       "prompt and extract them as upstream does (faithful) and with the fixes (robust). Several ranks "
                       "(torchrun, srun, mpirun) share the test set; --deepspeed partitions the model with ZeRO-3.")
    p.add_argument("--base", required=True, help="preset or local HF model directory (the adapter goes on it)")
    p.add_argument("--num-layers", type=int, default=None, help="a preset base's depth (default: the depth the "
                   "adapter was trained on, model.num_layers; without an adapter the preset's own)")
    p.add_argument("--adapter", default=None, help="peft-ds adapter directory (default: the base model alone)")
    p.add_argument("--dataset", required=True, help="comma-separated: gsm8k, AQuA, SVAMP, mawps, AddSub, MultiArith, "
                   "SingleEq, boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge, ARC-Easy, openbookqa")
    p.add_argument("--data-dir", required=True, help="directory holding <name>/test.json (LLM-Adapters' dataset/)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call (default 1)")
    p.add_argument("--num-beams", type=int, default=4, help="beam search width (default 4, as upstream)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 math, 32 commonsense (upstream)")
    p.add_argument("--extractor", default="faithful", choices=["faithful", "robust"],
                   help="the headline column; the other is reported beside it (default faithful)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each set (default: all)")
    p.add_argument("--deepspeed", default=None, metavar="DS_CONFIG", help="ZeRO-3 config: partition the model "
                   "(default: none, the whole model in each rank, on its GPU when CUDA is present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the model's dtype (default auto: fp32 on the CPU; on a GPU the dtype the adapter was trained "
                   "in, else bf16 where supported, else fp16; with --deepspeed the config's precision)")
    p.add_argument("--out", default=None, help="summary JSON (per-example rows go to the same name + l: .jsonl; "
                   "default: print only)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("check", help="check a run config for a world size before starting any rank",
                       description="Every check `peft-ds train` makes before work starts (config, DeepSpeed JSON, "
                       "model directory, data, output directory, batch sizes for the world size); starts nothing. "
                       "launcher/launch.sh runs it once before starting the ranks.")
    _run_config_arguments(p, "check as for --resume")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks the run will have")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="per-rank memory of a run before it is queued: model states, ZeRO-3 buffers, "
                       "activations, logits; whether it fits", description="Read the run config (a preset or a model "
                       "directory's config.json, no weights), its method, batch, cutoff, gradient checkpointing and "
                       "DeepSpeed config (resolved as training resolves it) and print each rank's memory term by term "
                       "(peft_ds/plan.py names the DeepSpeed setting or formula of each), the total against "
                       "--gpu-memory, the largest micro-batch that fits, and the same with "
                       "ds_configs/zero3_offload.json (GPU and host). launcher/launch.sh runs it before any rank.")
    _run_config_arguments(p, "accepted as train takes it; the plan is the same")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes, with --gpus-per-node (instead of --world-size; "
                   "default: --world-size ranks on one node)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node, with --nodes (default: none)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="memory of one GPU (default 80)")
    p.add_argument("--host-memory", type=float, default=None, metavar="GiB", help="host memory of one node, for the "
                   "verdict on the host peak while the backbone loads (default: none, no verdict)")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"], help="the ranks' collectives: nccl (GPUs; "
                   "default) or gloo (CPU ranks, whose all-gather stages its output again)")
    p.add_argument("--json", action="store_true", help="the same numbers by name, as JSON (bytes)")
    p.add_argument("--require-fit", action="store_true", help="exit 2 with one error line when the run does not fit")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("consolidate", help="a ZeRO-3 checkpoint (any world size) -> one adapter file, a PEFT "
                       "adapter, or a merged model", description="Rebuild every adapter tensor from the fp32 "
                       "partitions of a ZeRO-3 checkpoint written by peft-ds train (never reading backbone bytes) "
                       "and write one adapter. Needs no GPU and no process group.")
    p.add_argument("checkpoint_dir", help="a run's output_dir, its checkpoints/ directory, or one tag directory")
    p.add_argument("--out", required=True, help="output directory (built beside it and swapped in when complete; "
                   "never the checkpoint directory or base model it reads)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step80 (default: the one 'latest' names)")
    p.add_argument("--format", default="native", choices=["native", "peft"],
                   help="native (default): adapter.safetensors + adapter_config.json for peft_ds.load_adapter (every "
                   "method); peft: Hugging Face PEFT adapter (LoRA, merged AdaMix-LoRA, folded BiLoRA; no SIBO)")
    p.add_argument("--merge-into-base", metavar="BASE_DIR", default=None,
                   help="write a full HF model directory: BASE_DIR's weights with the LoRA delta s*B*A merged in "
                   "(LoRA family, no SIBO), one shard in memory at a time (default: an adapter only)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="adapter tensor dtype (default fp32); merged weights keep the base model's dtype")
    p.add_argument("--keep-experts", action="store_true", help="AdaMix: keep every expert (default: average them)")
    p.add_argument("--fold", action="store_true", help="BiLoRA: fold into plain LoRA, B' = P diag(lam), A' = Q "
                   "(always done for --format peft and --merge-into-base)")
    p.add_argument("--force", action="store_true", help="replace an existing output (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("preset", help="write a preset (random weights) as a local Hugging Face model directory",
                       description="Write a preset as config.json + model.safetensors + its tokenizer (tokenizer.model; "
                       "tokenizer.json + tokenizer_config.json for tiny-llama3 and tiny-qwen2), the layout "
                       "of a downloaded model, so that every path taking a model directory can be tried offline. "
                       "Tiny presets are the test models; the -shape presets have the published LLaMA-7B/13B and "
                       "GPT-J-6B configs with random weights (cut them with --num-layers on a CPU).")
    p.add_argument("name", help="tiny-llama, tiny-gptj, tiny-llama3, tiny-mistral, tiny-qwen2, or a real shape: "
                   "llama-7b-shape, llama-13b-shape, gptj-6b-shape")
    p.add_argument("--num-layers", type=int, default=None, help="cut the depth to this many layers (default: "
                   "the preset's own)")
    p.add_argument("dir", help="output directory (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory (each file replaced by a "
                   "rename)")
    p.set_defaults(func=cmd_preset)

    p = sub.add_parser("smoothness", help="over-smoothing diagnostic (SIBO Eq. 3) per layer, as JSON and PNG",
                       description="Mean token-wise cosine similarity of the hidden states after each layer (layer "
                       "0: the token embedding), one curve per --model and per --adapter, in one table, "
                       "smoothness.json and smoothness.png. Each --adapter goes on the base model its "
                       "adapter_config.json names (the one it was trained on), not on a --model; only an adapter "
                       "that names none takes the single --model given.")
    p.add_argument("--model", action="append", default=[], help="preset or model directory: a curve of its own "
                   "(repeatable)")
    p.add_argument("--adapter", action="append", default=[], help="peft-ds adapter directory: a curve of its base "
                   "model with it (repeatable)")
    p.add_argument("--num-layers", type=int, default=None, help="a preset's depth (default: the preset's own; "
                   "an adapter's preset base: the depth it was trained on)")
    p.add_argument("--data", default=DEFAULT_DATA, help="LLM-Adapters JSON file (default: shipped math sample)")
    p.add_argument("--num-examples", type=int, default=32, help="prompts from --data to measure on (default 32)")
    p.add_argument("--cutoff-len", type=int, default=256, help="tokens per prompt at most (default 256)")
    p.add_argument("--out", required=True, help="output directory for smoothness.json and smoothness.png")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=cmd_smoothness)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num_examples", "cutoff_len", "world_size", "batch_size", "num_beams", "max_new_tokens", "limit",
                 "num_layers"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"peft-ds: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except PeftDsError as err:
        print(f"peft-ds: error: {err}", file=sys.stderr)
        return 2


def console() -> None:
    """The `peft-ds` command and `python -m peft_ds`: `main`, then `exit_process` (a rank that held a
    process group leaves through os._exit). `--nproc` may replace this process by its light launcher."""
    from .distributed import exit_process, launcher_may_replace_process

    launcher_may_replace_process()
    exit_process(main())


if __name__ == "__main__":
    console()
