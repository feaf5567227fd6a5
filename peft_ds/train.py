"""`peft-ds train`: fine-tune a frozen, ZeRO-3-sharded backbone with adapters (SPEC 3 and 5).

The loop reads top to bottom: check inputs, build the sharded model, inject adapters, run global
steps (gradient accumulation over micro-batches), validate, checkpoint, stop cleanly on a signal.
Every rank runs this function; rank 0 alone logs and plots."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import torch

from . import checkpoint, data, distributed, ds_config, models, outputs, reporting
from .adapter_io import provenance, save_adapter
from .config import SCHEDULES, RunConfig, check_world_size, write_config
from .errors import PeftDsError
from .injection import adapter_parameters, apply_peft, format_report, trainable_report
from .local_launcher import HANDOFF_VARIABLE, remove_handoff
from .methods import SIBO_PARAMETER
from .objective import Feed, Objective

# DeepSpeed still calls the collectives torch renamed; one warning per call would drown the progress bar.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

EXIT_PREEMPTED = 75  # saved a checkpoint on SIGTERM/SIGUSR1 and stopped: requeue and resume
# Written by rank 0 beside the checkpoints when it stops that way. A launcher that ends every task when
# one exits (srun --kill-on-bad-exit) may report a slower rank's SIGTERM instead of 75; this file says
# what happened whatever exit code reaches the job script.
PREEMPTED_MARKER = "preempted.json"
POSTFIX = (("loss", "loss", ".4f"), ("grad_norm", "grad_norm", ".3g"), ("tok_s", "tokens_per_s", ".0f"))  # progress bar


class Preempted(Exception):
    """Raised after the checkpoint that a SIGTERM/SIGUSR1 asked for has been written."""


def lr_lambda(schedule: str, warmup: int, total: int):
    """The lr factor per global step of `transformers.get_scheduler`, the Trainer's and so LLM-Adapters'
    (linear: 0 at step 0, warm-up to 1 at `warmup`, then linear decay to 0 at `total`)."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(SCHEDULES[schedule], probe, num_warmup_steps=warmup,
                         num_training_steps=total).lr_lambdas[0]


def objective_for(model, spec, optimizer, scheduler, run) -> Objective:
    if spec.method.startswith("adamix"):
        from .methods.adamix import AdamixObjective

        return AdamixObjective(model.adamix_router, spec.consistency_weight)
    if spec.method == "bilora":
        from .bilevel import BilevelObjective

        return BilevelObjective(model, spec, optimizer, scheduler, *run["levels"])
    return Objective()


def make_optimizer(model, spec, t, total: int):
    """AdamW over the adapter parameters (BiLoRA: one group per level, stepped in turn), and the lr
    schedule over global steps (BiLoRA's T1 + T2 optimizer steps of a global step share its lr)."""
    trainable = list(adapter_parameters(model).values())
    sub_steps = 1
    if spec.method == "bilora":
        from .bilevel import LevelAdamW
        from .methods.bilora import split_parameters

        optimizer = LevelAdamW(*split_parameters(model), lr=t.lr, upper_lr=spec.upper_lr or t.lr,
                               weight_decay=t.weight_decay)
        sub_steps = spec.T1 + spec.T2
    else:
        optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    factor = lr_lambda(t.schedule, t.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: factor(k // sub_steps))
    return trainable, optimizer, scheduler


def _existing_run(output_dir: str) -> bool:
    """A checkpoint (even a partial one) or a logged training step: what a new run would overwrite. A
    run that failed before its first step left at most config.yaml, ds_config.json and empty files."""
    ckpt_root, metrics = os.path.join(output_dir, "checkpoints"), os.path.join(output_dir, "metrics.jsonl")
    if os.path.isdir(ckpt_root) and os.listdir(ckpt_root):
        return True
    if os.path.isfile(metrics):
        with open(metrics, errors="replace") as f:
            return any('"loss"' in line for line in f)
    return False


def _check_output_dir(output_dir: str) -> None:
    """output_dir is a directory, or can be made: probed by creating and removing a file in it or in
    its nearest existing ancestor (train() makes it, later)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise PeftDsError(f"output_dir {output_dir} exists and is not a directory")
    ancestor = outputs.nearest_existing(output_dir)
    if not os.path.isdir(ancestor):
        raise PeftDsError(f"output_dir {output_dir} cannot be made: {ancestor} is not a directory")
    try:
        outputs.probe(os.path.join(ancestor, f".peft-ds-probe-{os.getpid()}"))
    except OSError as err:
        raise PeftDsError(f"output_dir {output_dir} is not writable: cannot create a file in {ancestor} "
                          f"({err.strerror})") from None


def prepare(config: RunConfig, world_size: int):
    """Every check that needs no process group, in order; returns what the run needs."""
    distributed.clear_stale_op_locks()
    accumulation = check_world_size(config, world_size)
    raw_ds = ds_config.load(config.deepspeed)
    spec, t = config.method, config.train
    if spec.method == "bilora":
        from . import bilevel

        bilevel.check(spec, ds_config.zero_stage(raw_ds), world_size)
    dtype = ds_config.model_dtype(raw_ds, config.model.dtype)
    _check_output_dir(config.output_dir)
    reporting.check(t.report_to)
    models.check_model_source(config.model.name_or_path, config.model.num_layers)
    skeleton = models.build_skeleton(config.model.name_or_path, config.model.num_layers)  # meta device: every targeting rule, no memory
    with torch.random.fork_rng(devices=[]):
        apply_peft(skeleton, spec)
    tokenizer = models.load_tokenizer_for(config.model.name_or_path)
    train_set, val_set = data.build_datasets(config.data, tokenizer, t.seed)
    steps_per_epoch = len(train_set) // t.global_batch_size
    levels = None
    if spec.method == "bilora":  # an epoch is one pass over D1, T1 global batches per global step
        upper_set = data.build_upper_dataset(config.data, tokenizer)
        levels = bilevel.levels(train_set, upper_set, spec, t.seed, t.global_batch_size)
        steps_per_epoch = len(levels[0]) // (t.global_batch_size * spec.T1)
    if steps_per_epoch == 0:
        raise PeftDsError(f"{len(train_set)} training records are fewer than one global batch ({t.global_batch_size})")
    total = t.max_steps if t.max_steps > 0 else max(1, round(t.epochs * steps_per_epoch))
    resume = t.resume is True or (t.resume == "auto" and os.path.isfile(
        os.path.join(config.output_dir, "checkpoints", checkpoint.LATEST)))
    if not resume and _existing_run(config.output_dir):
        raise PeftDsError(f"output_dir {config.output_dir} already holds a run; resume it (--resume) or choose "
                          f"another output_dir")
    if resume:
        ckpt_root = os.path.join(config.output_dir, "checkpoints")
        tag, meta = checkpoint.find_checkpoint(ckpt_root)
        checkpoint.check_resume(os.path.join(ckpt_root, tag), meta, skeleton, config.model,
                                world_size, ds_config.zero_stage(raw_ds))
    resolved = ds_config.resolve(raw_ds, hidden_size=models.hidden_size_of(config.model.name_or_path),
                                 micro_batch_size=t.micro_batch_size, accumulation=accumulation,
                                 world_size=world_size, dtype=dtype)
    return dict(accumulation=accumulation, ds=resolved, dtype=dtype, tokenizer=tokenizer, train_set=train_set,
                val_set=val_set, levels=levels, total=total, steps_per_epoch=steps_per_epoch, resume=resume)


_HANDED_SETS = ("train_set", "val_set", "lower_set", "upper_set")


def save_prepared(run: dict, path: str) -> None:
    """What `prepare` returned, written by `peft-ds train --nproc` after its checks so that its ranks neither
    check nor tokenize again, nor import `datasets` (pandas, pyarrow): one JSON file, each tokenized data set as
    its list of examples (the ranks only take len() and [i] of a set). The tokenizer is loaded again (cheap).
    Rank 0 removes the directory once every rank has read it (`train`)."""
    sets = dict(zip(_HANDED_SETS, (run["train_set"], run["val_set"], *(run["levels"] or (None, None)))))
    scalars = {k: v for k, v in run.items() if k not in ("tokenizer", "train_set", "val_set", "levels")}
    handed = {**scalars, "sets": {name: dataset.to_list() for name, dataset in sets.items() if dataset is not None}}
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump(handed, f, separators=(",", ":"))


def load_prepared(path: str, config: RunConfig) -> dict:
    """`save_prepared`'s directory read back into what `prepare` returns (data sets as lists of examples)."""
    with open(os.path.join(path, "run.json")) as f:
        run = json.load(f)
    sets = run.pop("sets")
    levels = (sets["lower_set"], sets["upper_set"]) if "lower_set" in sets else None
    return {**run, "train_set": sets["train_set"], "val_set": sets.get("val_set"), "levels": levels,
            "tokenizer": models.load_tokenizer_for(config.model.name_or_path)}


def _batches(dataset, indices, micro, pad_id):
    return [data.collate([dataset[i] for i in indices[k:k + micro]], pad_id) for k in range(0, len(indices), micro)]


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(engine, batches, rank, world):
    """Token-weighted mean loss over the validation batches, sharded over ranks. Every rank runs the
    same number of forwards (ZeRO-3 gathers are collective): short shards repeat a batch with weight 0."""
    per_rank = -(-len(batches) // world)
    total = tokens = 0.0
    engine.eval()
    for k in range(per_rank):
        index = rank * per_rank + k
        batch = batches[index] if index < len(batches) else batches[0]
        loss = engine(**_to(batch, engine.device)).loss
        n = float((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum()) if index < len(batches) else 0.0
        total, tokens = total + loss.item() * n, tokens + n
    engine.train()
    total, tokens = distributed.all_reduce_sum([total, tokens])
    return total / tokens


def _grad_check(engine, model) -> tuple[int, int]:
    """(adapter parameters with a gradient, all adapter parameters) before the first optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    params = adapter_parameters(model)
    with_grad = sum(1 for p in params.values() if safe_get_full_grad(p) is not None)
    return with_grad, len(params)


def zero3_placement(engine, model) -> dict | None:
    """Where ZeRO-3 keeps each parameter: partitioned over the ranks, or persisted (whole on every rank,
    never gathered): DeepSpeed persists a parameter of at most stage3_param_persistence_threshold
    elements (`ds_persist`; "auto" is 10 x hidden). Counts and elements per kind (adapter, backbone), and
    the threshold DeepSpeed applied; None without ZeRO-3."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:
        return None
    adapters = set(map(id, adapter_parameters(model).values()))
    placement = {"threshold": offload.param_numel_persistence_threshold}
    for kind in ("adapter", "backbone"):
        placement[kind] = {"partitioned": [0, 0], "persisted": [0, 0]}
    for param in model.parameters():
        row = placement["adapter" if id(param) in adapters else "backbone"]
        counts = row["persisted" if getattr(param, "ds_persist", False) else "partitioned"]
        counts[0], counts[1] = counts[0] + 1, counts[1] + param.ds_numel
    return placement


def format_placement(placement: dict) -> str:
    def kind(name):
        row = placement[name]
        return (f"{name} parameters {row['partitioned'][0]} partitioned ({row['partitioned'][1]:,} elements), "
                f"{row['persisted'][0]} persisted ({row['persisted'][1]:,})")

    return (f"ZeRO-3: {kind('adapter')}; {kind('backbone')}; persisted: at most {placement['threshold']:,} "
            f"elements (stage3_param_persistence_threshold), whole on every rank")


def step_metrics(engine, spec) -> dict:
    """What every method logs beyond its objective's metrics (collective under ZeRO-3). grad_norm: the
    2-norm of the last optimizer step's whole gradient before clipping, the norm DeepSpeed clips with
    (ZeRO all-reduces it over the ranks' partitions; none without ZeRO). sibo_lambda: learnable SIBO's
    lambda = sigmoid(theta) per decoder layer, in layer order."""
    import deepspeed

    row = {}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        row["grad_norm"] = float(norm)
    if spec.sibo and spec.sibo_learnable:
        thetas = [p for name, p in engine.module.named_parameters() if name.endswith(SIBO_PARAMETER)]
        with deepspeed.zero.GatheredParameters(thetas):
            row["sibo_lambda"] = [float(torch.sigmoid(theta.detach().float())) for theta in thetas]
    return row


def fp32_adapter_state(model) -> dict:
    """The fp32 master values of every adapter parameter (collective under ZeRO); the parameter itself
    where DeepSpeed keeps no separate master (fp32 without ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in adapter_parameters(model).items():
        value = safe_get_full_fp32_param(param)
        state[name] = (value if value is not None else param.detach()).float().cpu().clone()
    return state


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                train.append((row["step"], row["loss"]))
            if "val_loss" in row:
                val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def final_losses(metrics_path: str) -> str:
    """'final training loss L (step S), validation loss V (step S)' from metrics.jsonl."""
    last = {}
    with open(metrics_path) as f:
        for row in map(json.loads, f):
            last.update({k: (row[k], row["step"]) for k in ("loss", "val_loss") if k in row})
    parts = [f"{label} {last[k][0]:.4f} (step {last[k][1]})"
             for k, label in (("loss", "final training loss"), ("val_loss", "validation loss")) if k in last]
    return ", ".join(parts)


def next_commands(config: RunConfig, summary: dict) -> list[str]:
    """Copy-paste commands that consolidate and evaluate the run just finished (its adapter on 4 examples
    of the shipped test-set sample, greedy: gsm8k after math data, boolq after commonsense; drop --limit
    and --num-beams for upstream's protocol on a real test set)."""
    import shlex

    def shown(path):  # relative to the working directory when inside it, else absolute
        relative = os.path.relpath(path)
        return shlex.quote(path if relative.startswith("..") else relative)

    out = config.output_dir
    dataset = "boolq" if "commonsense" in os.path.basename(config.data.train_file).lower() else "gsm8k"
    return [f"peft-ds consolidate {shown(out)} --out {shown(os.path.join(out, 'consolidated'))}",
            f"peft-ds evaluate --base {shlex.quote(config.model.name_or_path)} --adapter {shown(summary['adapter'])} "
            f"--dataset {dataset} --data-dir {shown(os.path.join(models.ASSETS, 'eval'))} --limit 4 --num-beams 1 "
            f"--out {shown(os.path.join(out, f'eval_{dataset}.json'))}"]


def _complete_row(line: str) -> bool:
    """False for a line a kill cut off mid-write."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return line.endswith("\n")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines past the resumed checkpoint (written by the interrupted run after its last save)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if _complete_row(line) and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def train(config: RunConfig) -> dict:
    import deepspeed
    from tqdm.auto import tqdm

    # ---- inputs: everything that can be wrong is checked before any work -------------------------
    handed = os.environ.pop(HANDOFF_VARIABLE, None)
    run = load_prepared(handed, config) if handed else prepare(config, distributed.world_size_from_env())
    rank, world = distributed.init()
    distributed.barrier()  # every rank has checked the output directory before rank 0 writes into it
    if rank == 0:  # every rank has read the handed inputs: gone now, even if the run is killed later
        remove_handoff(handed)
    t, out = config.train, config.output_dir
    ckpt_root, metrics_path = os.path.join(out, "checkpoints"), os.path.join(out, "metrics.jsonl")
    is_main = rank == 0
    where = distributed.describe()  # collective
    if is_main:
        print(f"peft-ds train: {where}", flush=True)

    # ---- model: sharded at construction, adapters injected identically on every rank ------------
    model = models.build_model(config.model.name_or_path, dtype=ds_config.DTYPES[run["dtype"]], ds_config=run["ds"],
                               num_layers=config.model.num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        apply_peft(model, config.method)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    trainable, optimizer, scheduler = make_optimizer(model, config.method, t, run["total"])
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=trainable, config=run["ds"])
    objective = objective_for(model, config.method, optimizer, scheduler, run)
    placement = zero3_placement(engine, model)
    if is_main:
        print(format_report(trainable_report(model)), flush=True)
        if placement is not None:
            print(format_placement(placement), flush=True)

    start = 0
    if run["resume"]:
        start, _ = checkpoint.load(engine, ckpt_root, objective)
        if is_main:
            _truncate_metrics(metrics_path, start)
            print(f"resumed from {ckpt_root} at step {start}", flush=True)
    if is_main:  # only now: a run that fails while building or loading leaves its output_dir as it was
        os.makedirs(ckpt_root, exist_ok=True)
        write_config(config, os.path.join(out, "config.yaml"))
        with open(os.path.join(out, "ds_config.json"), "w") as f:
            json.dump(run["ds"], f, indent=2)
    meta = checkpoint.run_meta(model, config, world, ds_config.zero_stage(run["ds"]), run["dtype"])

    # ---- signals: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary ---------------
    stop = {"asked": False}
    previous = {s: signal.signal(s, lambda *_: stop.__setitem__("asked", True))
                for s in (signal.SIGTERM, signal.SIGUSR1)}

    pad_id, micro = run["tokenizer"].pad_token_id, t.micro_batch_size
    accumulation, train_set = run["accumulation"], run["train_set"]
    feed = Feed(rank=rank, world=world, accumulation=accumulation, micro=micro, global_batch=t.global_batch_size,
                pad_id=pad_id, seed=t.seed, device=engine.device)
    val_batches = None if run["val_set"] is None else _batches(run["val_set"], list(range(len(run["val_set"]))),
                                                               micro, pad_id)  # collated once, used at every eval
    bar = tqdm(total=run["total"], initial=start, disable=not is_main, desc="train", unit="step", dynamic_ncols=True)
    reporter = reporting.Reporter(config, start if run["resume"] else None) if is_main else None
    metrics = reporter.metrics if is_main else None  # metrics.jsonl, for the set-up row
    last_saved = start if run["resume"] else None

    def grad_check(k):  # every adapter parameter has a gradient after the first step's backward
        if k == accumulation - 1:
            with_grad, n_params = _grad_check(engine, model)
            if with_grad != n_params:
                raise RuntimeError(f"only {with_grad} of {n_params} adapter parameters received a gradient")
            if is_main:  # the start of a run: gradients seen, where ZeRO-3 placed the parameters
                row = {"step": 0, "grad_check": [with_grad, n_params]}
                metrics.write(json.dumps({**row, "zero3_placement": placement} if placement else row) + "\n")

    try:
        for step in range(start, run["total"]):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the lr this step applies, as the Trainer logs it
            objective.begin_step(step)
            stats = objective.train_step(engine, feed, train_set, step,
                                         grad_check if step == start and not run["resume"] else None)
            loss_sum, losses, tokens, asked = distributed.all_reduce_sum(
                [stats["loss_sum"], stats["losses"], stats["tokens"], float(stop["asked"])])
            done, seconds = step + 1, time.perf_counter() - began
            row = {"step": done, "loss": loss_sum / losses, "lr": lr, "step_s": seconds,
                   "tokens_per_s": tokens / seconds, **objective.metrics(), **step_metrics(engine, config.method)}
            if "route_digest" in row and not distributed.same_on_all_ranks(row["route_digest"]):
                raise RuntimeError(f"AdaMix routes differ between ranks at step {done}")
            if run["val_set"] is not None and (done == run["total"] or (t.eval_every and done % t.eval_every == 0)):
                row["val_loss"] = validation_loss(engine, val_batches, rank, world)
            if is_main:
                if done % t.log_every == 0 or "val_loss" in row or done == run["total"]:
                    reporter.log(row)
                bar.set_postfix({name: f"{row[key]:{spec}}" for name, key, spec in POSTFIX if key in row})
                bar.update(1)
            if done == run["total"] or asked or (t.save_every and done % t.save_every == 0):
                checkpoint.save(engine, ckpt_root, done, meta, objective.state_dict(), t.save_frozen_params)
                last_saved = done
            if asked:
                if is_main:
                    with open(os.path.join(out, PREEMPTED_MARKER), "w") as f:
                        json.dump({"step": done, "checkpoint": os.path.join(ckpt_root, f"step{done}")}, f)
                raise Preempted()
    finally:
        bar.close()
        if reporter:
            reporter.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    # ---- outputs: the fp32 adapter, the loss curve ------------------------------------------------
    if last_saved != run["total"]:
        checkpoint.save(engine, ckpt_root, run["total"], meta, objective.state_dict(), t.save_frozen_params)
    state = fp32_adapter_state(engine.module)
    summary = {"steps": run["total"], "checkpoint": os.path.join(ckpt_root, f"step{run['total']}"),
               "adapter": os.path.join(out, "adapter"), "loss_plot": os.path.join(out, "loss.png"),
               "metrics": metrics_path}
    extra_outputs = objective.write_outputs(out, is_main)  # collective (BiLoRA gathers lam)
    summary.update(extra_outputs)
    if is_main:
        save_adapter(engine.module, summary["adapter"], base_model=config.model.name_or_path, state=state,
                     extra=provenance("peft-ds train", summary["checkpoint"], world, run["total"],
                                      config.method.method, model_dtype=run["dtype"]))
        plot_losses(metrics_path, summary["loss_plot"])
        print(f"checkpoint: {summary['checkpoint']}\nadapter:    {summary['adapter']}\n"
              f"loss plot:  {summary['loss_plot']}\nmetrics:    {metrics_path}", flush=True)
        for name, path in extra_outputs.items():
            print(f"{name + ':':11s} {path}", flush=True)
        print(final_losses(metrics_path) + "\nnext:\n" + "\n".join(f"  {c}" for c in next_commands(config, summary)),
              flush=True)
    distributed.barrier()
    model.hf_deepspeed_config = None
    return summary
