"""`peft-ds evaluate` (SPEC 5): a base model, with or without an adapter, on the LLM-Adapters test
sets (`<data_dir>/<name>/test.json`).

`faithful` reproduces LLM-Adapters `evaluate.py` (math) and `commonsense_evaluate.py` byte for byte:
the evaluation prompt, 4-beam search (their temperature/top_p/top_k are inert without sampling),
256 new tokens for math and 32 for commonsense, the text between the first and the second
"### Response:", and their extraction rules. `robust` fixes their known weaknesses and is reported
beside `faithful`, never instead of it. Batches are left-padded and generate() gets the attention
mask (upstream drops it, issue #61), so any batch size gives the batch-1 answers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

from . import outputs
from .errors import PeftDsError, read_json
from .prompts import evaluation_prompt

MATH_NUMERIC = ("gsm8k", "SVAMP", "mawps", "AddSub", "MultiArith", "SingleEq")
MATH_LETTER = ("AQuA",)
_CHOICES5 = r"answer1|answer2|answer3|answer4|answer5"
COMMONSENSE = {"boolq": r"true|false", "piqa": r"solution1|solution2", "social_i_qa": _CHOICES5,
               "hellaswag": r"ending1|ending2|ending3|ending4", "winogrande": r"option1|option2",
               "ARC-Challenge": _CHOICES5, "ARC-Easy": _CHOICES5, "openbookqa": _CHOICES5}
DATASETS = MATH_NUMERIC + MATH_LETTER + tuple(COMMONSENSE)
MODES = ("faithful", "robust")
# Upstream settings per family: new tokens, and whether decode() skips special tokens.
FAMILY = {"math": {"max_new_tokens": 256, "skip_special_tokens": False},
          "commonsense": {"max_new_tokens": 32, "skip_special_tokens": True}}
TOLERANCE = 0.001  # evaluate.py: correct iff |label - prediction| <= 0.001
_NUMBER = r"-?\d+\.?\d*"  # evaluate.py's number pattern


def family(dataset: str) -> str:
    check_names([dataset])
    return "commonsense" if dataset in COMMONSENSE else "math"


def check_names(names) -> None:
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise PeftDsError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")


def response_of(decoded: str) -> str:
    """Upstream: `output.split("### Response:")[1].strip()`."""
    parts = decoded.split("### Response:")
    return parts[1].strip() if len(parts) > 1 else ""


# ---- answer extraction ------------------------------------------------------------------------------------


def _faithful(dataset: str, text: str):
    if dataset in MATH_LETTER:  # extract_answer_letter: the first A-E anywhere ("Each" gives E)
        found = re.findall(r"A|B|C|D|E", text.strip())
        return found[0] if found else ""
    if dataset in COMMONSENSE:  # the first match of the dataset's pattern, "" when none
        found = re.findall(COMMONSENSE[dataset], text)
        return found[0] if found else ""
    found = re.findall(_NUMBER, text.replace(",", ""))  # extract_answer_number: commas removed, last number
    return float(found[-1]) if found else math.inf


_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def _after_answer_is(text: str) -> str | None:
    """The text after the last 'answer is', or None."""
    cut = [m.end() for m in _ANSWER_IS.finditer(text)]
    return text[cut[-1]:] if cut else None


def _robust(dataset: str, text: str):
    tail = _after_answer_is(text)
    if dataset in MATH_LETTER:
        # a letter standing alone as an option, "(C)" or "C" after "answer is", never inside a word
        for source, pattern in ((tail, r"^\s*\(?([A-E])\b"), (text, r"\(([A-E])\)"), (text, r"(?<![A-Za-z])([A-E])\)")):
            found = re.search(pattern, source) if source is not None else None
            if found:
                return found.group(1)
        return ""
    if dataset in COMMONSENSE:  # case-insensitive; the option named after "answer is" wins
        pattern = re.compile(COMMONSENSE[dataset], re.IGNORECASE)
        found = (pattern.search(tail) if tail is not None else None) or pattern.search(text)
        return found.group(0).lower() if found else ""
    # thousands separators only ("1,234"), not list commas ("3, 4"); the number after "answer is" wins
    number = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
    found = re.search(number, tail) if tail is not None else None
    if found is None:
        numbers = re.findall(number, text)
        return float(numbers[-1].replace(",", "")) if numbers else math.inf
    return float(found.group(0).replace(",", ""))


def extract_answer(dataset: str, text: str, mode: str = "faithful"):
    """The prediction in a response: a float for the numeric math sets (inf when there is no number),
    a string otherwise ("" when nothing matches)."""
    check_names([dataset])
    if mode not in MODES:
        raise PeftDsError(f"unknown extractor {mode!r}; choose one of {', '.join(MODES)}")
    return _faithful(dataset, text) if mode == "faithful" else _robust(dataset, text)


def is_correct(dataset: str, prediction, label) -> bool:
    if dataset in MATH_NUMERIC:
        return abs(float(label) - prediction) <= TOLERANCE
    return prediction == label


# ---- data -------------------------------------------------------------------------------------------------


def read_test_set(data_dir: str, name: str) -> list[dict]:
    path = os.path.join(data_dir, name, "test.json")
    records = read_json(path, f"test set {name}")
    if not isinstance(records, list) or not records:
        raise PeftDsError(f"test set {path} must be a non-empty JSON array of records")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or "answer" not in record:
            raise PeftDsError(f"test set {path}: record {index} needs a string 'instruction' and an 'answer'")
        if name in MATH_NUMERIC:
            try:
                float(record["answer"])
            except (TypeError, ValueError):
                raise PeftDsError(f"test set {path}: record {index} has a non-numeric answer "
                                  f"{record['answer']!r}") from None
    return records


# ---- generation -------------------------------------------------------------------------------------------


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int, num_beams: int, max_new_tokens: int,
             skip_special_tokens: bool, synced: bool = False, batches: int | None = None, progress=None) -> list[str]:
    """Decoded prompt + continuation of each prompt, batch by batch: left padding with the attention
    mask, KV cache on; each row's continuation ends at its first EOS, as a batch of one would stop.
    `synced` (ZeRO-3 across ranks): every rank runs `batches` generate() calls, repeating its last
    batch when its shard is shorter, so that the partitioned forwards stay collective."""
    from .data import left_pad

    encoded = [tokenizer.encode(p) for p in prompts]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    starts = list(range(0, len(encoded), batch_size))
    device = next(model.parameters()).device
    texts = []
    for k in range(batches if batches is not None else len(starts)):
        start = starts[min(k, len(starts) - 1)] if starts else None
        chunk = encoded[start:start + batch_size] if starts else [tokenizer.encode("")]
        ids, mask = left_pad(chunk, pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), num_beams=num_beams,
                             do_sample=False, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad,
                             eos_token_id=eos, synced_gpus=synced)
        if starts and k < len(starts):
            for row, prompt_ids in enumerate(chunk):
                new = _until_eos(out[row, ids.shape[1]:].tolist(), eos)
                texts.append(tokenizer.decode(prompt_ids + new, skip_special_tokens=skip_special_tokens))
            if progress is not None:
                progress.update(len(chunk))
    return texts


# ---- the command -------------------------------------------------------------------------------------------


def _check_adapter(adapter_dir: str, base: str, num_layers: int | None) -> int | None:
    """An adapter trained on another architecture or size is refused before the base is loaded; returns
    the depth to build a preset base at (`adapter_io.preset_depth`)."""
    from .adapter_io import preset_depth, read_adapter_config, signature
    from .models import PRESETS, preset_fields, read_model_config

    adapter_config = read_adapter_config(adapter_dir)
    trained = signature(adapter_config["base"])
    num_layers = preset_depth(adapter_config, base, num_layers)
    actual = signature(preset_fields(base, num_layers) if base in PRESETS else read_model_config(base))
    if trained != actual:
        raise PeftDsError(f"adapter {adapter_dir} was trained on {trained}, the base {base} is {actual}")
    return num_layers


def _check_out(out: str, base: str, adapter: str | None, test_files: list[str], deepspeed_config: str | None):
    """`--out` and its rows file: apart from every input (adapter and model directories, test files,
    the DeepSpeed config), not a directory, and in a directory that takes a new file; all before the
    model is loaded, so that no generation is wasted."""
    inputs = [("the adapter directory", adapter)] if adapter else []
    if os.path.isdir(base):
        inputs.append(("the base model directory", base))
    inputs += [("the test set", path) for path in test_files if os.path.exists(path)]
    if deepspeed_config:
        inputs.append(("the DeepSpeed config", deepspeed_config))
    for path in (out, rows_path(out)):
        outputs.check_apart(path, "--out", inputs)
        if os.path.isdir(path):
            raise PeftDsError(f"--out {path} is a directory; --out names the summary JSON file")
    outputs.check_writable(out)


def evaluation_dtype(requested: str, device, adapter: str | None) -> str:
    """The dtype the model generates in without ZeRO: `requested` unless auto; auto on the CPU is fp32 (bf16
    there is 150x slower), on a GPU the dtype the adapter was trained in (adapter_config.json's
    source.model_dtype), else bf16 where the GPU has it and fp16 where not."""
    from .adapter_io import read_adapter_config

    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    trained = read_adapter_config(adapter).get("source", {}).get("model_dtype") if adapter else None
    if trained:
        return trained
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def evaluate(base: str, datasets: list[str], data_dir: str, adapter: str | None = None, batch_size: int = 1,
             num_beams: int = 4, max_new_tokens: int | None = None, extractor: str = "faithful",
             out: str | None = None, limit: int | None = None, deepspeed_config: str | None = None,
             force: bool = False, progress: bool = True, num_layers: int | None = None, dtype: str = "auto") -> dict:
    """Every dataset in turn; rank 0 writes `<out>` (summary JSON) and `<out>.jsonl` (per example)."""
    from tqdm.auto import tqdm

    from . import distributed, ds_config, models
    from .adapter_io import load_adapter

    check_names(datasets)
    if out:
        _check_out(out, base, adapter, [os.path.join(data_dir, name, "test.json") for name in datasets],
                   deepspeed_config)
    if out and not force and any(os.path.exists(p) for p in (out, rows_path(out))):
        raise PeftDsError(f"{out} exists (use --force to overwrite)")
    if dtype != "auto" and dtype not in ds_config.DTYPES:
        raise PeftDsError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(ds_config.DTYPES)}")
    if extractor not in MODES:
        raise PeftDsError(f"unknown --extractor {extractor!r}; choose one of {', '.join(MODES)}")
    for name, value in (("batch size", batch_size), ("num beams", num_beams), ("max new tokens", max_new_tokens or 1)):
        if value < 1:
            raise PeftDsError(f"{name} must be >= 1, got {value}")
    models.check_model_source(base, num_layers)
    if adapter:
        num_layers = _check_adapter(adapter, base, num_layers)
    test_sets = {name: read_test_set(data_dir, name)[:limit] for name in datasets}
    raw_ds = ds_config.load(deepspeed_config) if deepspeed_config else None
    if raw_ds is not None and ds_config.zero_stage(raw_ds) != 3:
        raise PeftDsError(f"--deepspeed {deepspeed_config}: evaluation partitions the model with ZeRO-3; this is "
                          f"ZeRO-{ds_config.zero_stage(raw_ds)}")

    world = distributed.world_size_from_env()
    rank = 0
    if world > 1 or raw_ds is not None:
        distributed.clear_stale_op_locks()
        rank, world = distributed.init()
    device = distributed.local_device()
    if raw_ds is not None:
        dtype_name = ds_config.model_dtype(raw_ds, dtype)
    else:
        dtype_name = evaluation_dtype(dtype, device, adapter)
    resolved = None
    if raw_ds is not None:
        resolved = ds_config.resolve(raw_ds, hidden_size=models.hidden_size_of(base), micro_batch_size=batch_size,
                                     accumulation=1, world_size=world, dtype=dtype_name)
    model = models.build_model(base, dtype=ds_config.DTYPES[dtype_name], ds_config=resolved, num_layers=num_layers,
                               device=None if resolved is not None else device)
    tokenizer = models.load_tokenizer_for(base)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    model.config.use_cache = True
    if resolved is not None:
        import deepspeed

        model = deepspeed.initialize(model=model, config=resolved)[0].module
        model.eval()

    rows, summary = [], {}
    for name, records in test_sets.items():
        settings = FAMILY[family(name)]
        mine = list(range(rank, len(records), world))  # interleaved shards: similar lengths on every rank
        per_rank = -(-len(records) // world)
        bar = tqdm(total=len(mine), desc=name, unit="ex", disable=not progress or rank != 0, dynamic_ncols=True)
        texts = generate(model, tokenizer, [evaluation_prompt(records[i]["instruction"]) for i in mine], batch_size,
                         num_beams, max_new_tokens or settings["max_new_tokens"], settings["skip_special_tokens"],
                         synced=resolved is not None and world > 1, batches=-(-per_rank // batch_size), progress=bar)
        bar.close()
        results = []
        for index, text in zip(mine, texts):
            response = response_of(text)
            label = records[index]["answer"]
            row = {"dataset": name, "id": index, "output": response, "label": label}
            for mode in MODES:
                prediction = extract_answer(name, response, mode)
                row[f"prediction_{mode}"] = prediction if prediction != math.inf else None
                row[f"correct_{mode}"] = is_correct(name, prediction, label)
            results.append(row)
        if world > 1:
            results = sorted((r for part in distributed.all_gather_object(results) for r in part), key=lambda r: r["id"])
        rows += results
        summary[name] = {mode: sum(r[f"correct_{mode}"] for r in results) / len(results) for mode in MODES}
        summary[name]["examples"] = len(results)
        summary[name]["max_new_tokens"] = max_new_tokens or settings["max_new_tokens"]
    summary["average"] = {mode: sum(summary[n][mode] for n in datasets) / len(datasets) for mode in MODES}
    # every setting that shaped the result (max_new_tokens per dataset beside its accuracy)
    report = {"base": base, "num_layers": num_layers, "adapter": adapter and os.path.abspath(adapter),
              "data_dir": os.path.abspath(data_dir), "datasets": datasets, "limit": limit,
              "max_new_tokens": max_new_tokens, "extractor": extractor, "batch_size": batch_size,
              "num_beams": num_beams, "dtype": dtype_name, "device": str(device), "deepspeed": deepspeed_config, "world_size": world,
              "accuracy": summary}
    if rank == 0 and out:
        # each file replaced whole by a rename; the summary last, naming its rows by their sha256
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        outputs.write_text(rows_path(out), lines)
        report["rows_sha256"] = hashlib.sha256(lines.encode()).hexdigest()
        outputs.write_text(out, json.dumps(report, indent=2))
    report["rows"] = rows
    return report


def rows_path(out: str) -> str:
    """Where the per-example rows go beside the summary: results.json -> results.jsonl."""
    return out + "l" if out.endswith(".json") else out + ".jsonl"


def format_summary(report: dict) -> str:
    primary = report["extractor"]
    other = [m for m in MODES if m != primary][0]
    lines = [f"{'dataset':<16}{'examples':>9}{primary:>10}{other:>10}"]
    for name, acc in report["accuracy"].items():
        if name != "average":
            lines.append(f"{name:<16}{acc['examples']:>9}{100 * acc[primary]:>10.1f}{100 * acc[other]:>10.1f}")
    avg = report["accuracy"]["average"]
    lines.append(f"{'average':<16}{'':>9}{100 * avg[primary]:>10.1f}{100 * avg[other]:>10.1f}")
    return "\n".join(lines)

