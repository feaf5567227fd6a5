"""LLM-Adapters JSON data: reading records and turning prompts into left-padded batches."""

from __future__ import annotations

import json

import torch

from .errors import PeftDsError, read_json
from .prompts import generate_prompt

FIELDS = ("instruction", "input", "output")


def read_records(path: str) -> list[dict]:
    records = read_json(path, "data file")
    if not isinstance(records, list) or not records:
        raise PeftDsError(f"data file {path} must hold a non-empty JSON array of records")
    if not isinstance(records[0], dict):
        raise PeftDsError(f"data file {path}: record 0 is not a JSON object")
    for i, record in enumerate(records):
        missing = [k for k in FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise PeftDsError(f"data file {path}: record {i} lacks field(s) {', '.join(missing)}")
        # a null or a number would be trained on as the text "None" / "1" (an `answer` may be a number)
        wrong = [k for k in FIELDS if not isinstance(record[k], str)]
        if wrong:
            value = json.dumps(record[wrong[0]])
            raise PeftDsError(f"data file {path}: record {i} field {wrong[0]} must be a string, got "
                              f"{value if len(value) <= 40 else value[:37] + '...'}")
    return records


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the left (LLM-Adapters: padding_side = "left")."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def prompt_batch(tokenizer, records: list[dict], cutoff_len: int) -> dict:
    """The training prompts of `records`, tokenized (truncated at cutoff_len) and left-padded."""
    sequences = [tokenizer.encode(generate_prompt(r))[:cutoff_len] for r in records]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


# ---- training data (LLM-Adapters finetune.py conventions, reference notes 2.2-2.3) ---------------

IGNORE_INDEX = -100


def tokenize_record(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool) -> dict:
    """input_ids and labels of one record: truncation at cutoff_len, EOS appended when the last token
    is not EOS and there is room, labels of the prompt masked unless train_on_inputs."""
    ids = tokenizer.encode(generate_prompt(record))[:cutoff_len]
    if ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    if not train_on_inputs:
        user_len = len(tokenizer.encode(generate_prompt({**record, "output": ""}))[:cutoff_len])
        labels = [IGNORE_INDEX] * user_len + labels[user_len:]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int, multiple_of: int = 8) -> dict:
    """Left padding to a multiple of 8 (DataCollatorForSeq2Seq(pad_to_multiple_of=8)); labels -100."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, width - n:] = torch.tensor(e["input_ids"])
        labels[row, width - n:] = torch.tensor(e["labels"])
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_datasets(data_config, tokenizer, seed: int):
    """(train, validation or None) as tokenized `datasets.Dataset`s. Validation is the given file, or a
    seeded split of val_set_size records (train_test_split(shuffle=True, seed)), as LLM-Adapters."""
    train = _as_dataset(read_records(data_config.train_file))
    val = None
    if data_config.validation_file:
        val = _as_dataset(read_records(data_config.validation_file))
    elif data_config.val_set_size > 0:
        if data_config.val_set_size >= len(train):
            raise PeftDsError(
                f"data.val_set_size {data_config.val_set_size} leaves no training records "
                f"({data_config.train_file} has {len(train)})"
            )
        split = train.train_test_split(test_size=data_config.val_set_size, shuffle=True, seed=seed)
        train, val = split["train"], split["test"]

    return (_tokenized(train, "training", data_config, tokenizer),
            None if val is None else _tokenized(val, "validation", data_config, tokenizer))


def build_upper_dataset(data_config, tokenizer):
    """BiLoRA's D2 from data.upper_file, tokenized as the training set; None without that file."""
    if not data_config.upper_file:
        return None
    return _tokenized(_as_dataset(read_records(data_config.upper_file)), "upper-level", data_config, tokenizer)


def _as_dataset(records: list[dict]):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_list([{k: str(r[k]) for k in FIELDS} for r in records])


def _tokenized(ds, name: str, data_config, tokenizer):
    def tokenize(record):
        return tokenize_record(tokenizer, record, data_config.cutoff_len, data_config.train_on_inputs)

    def has_target(example):  # a record whose answer lies beyond cutoff_len teaches nothing
        return any(label != IGNORE_INDEX for label in example["labels"][1:])

    ds = ds.map(tokenize, remove_columns=ds.column_names).filter(has_target)
    if len(ds) == 0:
        raise PeftDsError(f"no {name} records left after tokenization (every answer lies beyond "
                          f"data.cutoff_len {data_config.cutoff_len})")
    return ds


def epoch_order(num_records: int, seed: int, epoch: int) -> torch.Tensor:
    """The record order of one epoch: a permutation drawn from (seed, epoch), the same on every rank."""
    return torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 1009 + epoch))


def global_batch_indices(num_records: int, global_batch: int, seed: int, step: int) -> list[int]:
    """Record indices of optimizer step `step` (a partial last global batch of an epoch is dropped)."""
    steps_per_epoch = num_records // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(num_records, seed, epoch)
    return order[within * global_batch:(within + 1) * global_batch].tolist()


def bilevel_split(num_records: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """BiLoRA's D1 (lower level) and D2 (upper level): a seeded shuffle of the training records cut at
    `ratio` (SPEC 2.5: 8:2; BiDoRA's random_split(int(0.8 N), N - int(0.8 N)))."""
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(ratio * num_records)
    if cut == 0 or cut == num_records:
        raise PeftDsError(f"split_ratio {ratio} leaves one level without records ({num_records} records)")
    return sorted(order[:cut]), sorted(order[cut:])
