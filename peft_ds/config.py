"""Run configuration: one YAML file per run, every key overridable with `--set section.key=value`.

The one config loader: unknown keys and wrong types are errors naming the key, raised before any
work starts. The fully resolved config is written into the output directory (`config.yaml`)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from .errors import PeftDsError
from .spec import PeftSpec


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-llama"  # a preset name or a local Hugging Face model directory
    dtype: str = "auto"  # auto (from the DeepSpeed config) | fp32 | bf16 | fp16
    num_layers: int | None = None  # a preset's depth cut to this many layers (null: the preset's own)


@dataclass
class DataConfig:
    train_file: str = "peft_ds/assets/math_sample.json"
    validation_file: str | None = None
    upper_file: str | None = None  # BiLoRA's D2 (upper level); None: a seeded split of train_file (split_ratio)
    val_set_size: int = 120  # taken from the training file (seeded split) when no validation_file
    cutoff_len: int = 256
    train_on_inputs: bool = True  # LLM-Adapters default: the loss covers prompt and answer


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    epochs: float = 3.0
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.0
    seed: int = 42
    save_every: int = 80  # optimizer steps between checkpoints (0: only at the end)
    eval_every: int = 80  # optimizer steps between validation losses (0: only at the end)
    gradient_checkpointing: bool = False
    resume: bool | str = False  # false | true (must resume) | auto (resume when a complete checkpoint exists)
    log_every: int = 1
    # where metrics rows go besides metrics.jsonl (always written): tensorboard (<output_dir>/tensorboard/),
    # wandb (Weights & Biases, WANDB_MODE=offline honoured); REPORT_TO names them
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    # DeepSpeed's default, off here: every rank's shard of the frozen backbone in each checkpoint
    # (self-contained checkpoints, backbone-sized files); consolidation never reads those bytes
    save_frozen_params: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: PeftSpec = field(default_factory=PeftSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: str = "ds_configs/zero3_cpu.json"
    output_dir: str = "runs/default"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method.to_dict()
        return d


SECTIONS = {"model": ModelConfig, "method": PeftSpec, "data": DataConfig, "train": TrainConfig}
# The lr schedules, by the names transformers.get_scheduler gives them (ours warm up first whatever the schedule).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = ("auto", "fp32", "bf16", "fp16")
RESUME = (False, True, "auto")
REPORT_TO = ("jsonl", "tensorboard", "wandb")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}


def _check_type(key: str, value, hint):
    """The value, converted where YAML's reading is narrower (int for float); else an error naming key."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    if value is None:
        if type(None) in args:
            return None
        raise PeftDsError(f"config key {key} must not be null")
    choices = [a for a in args if a is not type(None)] if args else [hint]
    if len(choices) > 1:  # a union such as bool | str: the value must be one of its types
        if any(type(value) is c for c in choices):
            return value
        raise PeftDsError(f"config key {key} must be one of {' or '.join(c.__name__ for c in choices)}, got {value!r}")
    base = choices[0]
    origin = typing.get_origin(base) or base
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PeftDsError(f"config key {key} must be a list of strings, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise PeftDsError(f"config key {key} must be true or false, got {value!r}")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise PeftDsError(f"config key {key} must be of type {base.__name__}, got {value!r}")
    return value


def _build(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise PeftDsError("a run config must be a YAML mapping of sections")
    top = {"deepspeed": str, "output_dir": str}
    kwargs = {}
    for key, value in data.items():
        if key in top:
            kwargs[key] = _check_type(key, value, top[key])
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise PeftDsError(f"config section {key} must be a mapping, got {value!r}")
            fields = _fields(SECTIONS[key])
            section = {}
            for name, v in value.items():
                if name not in fields:
                    raise PeftDsError(f"unknown config key {key}.{name} (known: {', '.join(fields)})")
                section[name] = _check_type(f"{key}.{name}", v, fields[name])
            kwargs[key] = SECTIONS[key](**section)
        else:
            raise PeftDsError(f"unknown config key {key} (known: {', '.join([*SECTIONS, *top])})")
    return RunConfig(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value read as YAML) or `key=value` for the top-level keys."""
    for item in overrides:
        if "=" not in item:
            raise PeftDsError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        parts = dotted.strip().split(".")
        if len(parts) == 1:
            data[parts[0]] = value
        elif len(parts) == 2:
            section = data.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise PeftDsError(f"--set {dotted}: {parts[0]} is not a section")
            section[parts[1]] = value
        else:
            raise PeftDsError(f"--set {dotted}: expected section.key")
    return data


def validate(config: RunConfig) -> RunConfig:
    config.method.validate()
    m, d, t = config.model, config.data, config.train
    if m.dtype not in DTYPES:
        raise PeftDsError(f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
    for key, value in (("data.cutoff_len", d.cutoff_len), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.global_batch_size", t.global_batch_size), ("train.log_every", t.log_every)):
        if value < 1:
            raise PeftDsError(f"{key} must be >= 1, got {value}")
    for key, value in (("data.val_set_size", d.val_set_size), ("train.max_steps", t.max_steps),
                       ("train.warmup_steps", t.warmup_steps), ("train.save_every", t.save_every),
                       ("train.eval_every", t.eval_every), ("train.weight_decay", t.weight_decay)):
        if value < 0:
            raise PeftDsError(f"{key} must be >= 0, got {value}")
    if not t.lr > 0:
        raise PeftDsError(f"train.lr must be > 0, got {t.lr}")
    if t.epochs <= 0 and t.max_steps == 0:
        raise PeftDsError("train.epochs must be > 0 (or set train.max_steps)")
    if t.schedule not in SCHEDULES:
        raise PeftDsError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    if t.resume not in RESUME:
        raise PeftDsError(f"train.resume must be true, false or auto, got {t.resume!r}")
    unknown = [name for name in t.report_to if name not in REPORT_TO]
    if unknown:
        raise PeftDsError(f"train.report_to: unknown {', '.join(map(repr, unknown))} (known: {', '.join(REPORT_TO)})")
    if t.global_batch_size % t.micro_batch_size:
        raise PeftDsError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"{t.micro_batch_size}"
        )
    return config


def check_world_size(config: RunConfig, world_size: int) -> int:
    """Gradient-accumulation steps per rank; the world size must divide the global batch."""
    t = config.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise PeftDsError(
            f"world size {world_size} does not divide the global batch: train.global_batch_size "
            f"{t.global_batch_size} is not a multiple of micro_batch_size x world size = {per_step}"
        )
    return t.global_batch_size // per_step


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data = {}
    if path is not None:
        if os.path.isdir(path):
            raise PeftDsError(f"run config {path} is a directory, not a file")
        if not os.path.isfile(path):
            raise PeftDsError(f"run config {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise PeftDsError(f"run config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        except UnicodeDecodeError as err:
            raise PeftDsError(f"run config {path} is not UTF-8 text (byte {err.start})") from None
        except PermissionError:
            raise PeftDsError(f"run config {path} cannot be read (permission denied)") from None
        if data is None or data == {}:  # a run on nothing but defaults is a mistake, not a request
            raise PeftDsError(f"run config {path} is empty: it must set at least the run's sections")
        if not isinstance(data, dict):
            raise PeftDsError(f"run config {path} must be a YAML mapping of sections, got a "
                              f"{type(data).__name__}")
    return validate(_build(apply_overrides(data, list(overrides))))


def write_config(config: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
