"""LLM-Adapters JSON data: reading records and turning prompts into left-padded batches."""

from __future__ import annotations

import json

import torch

from .errors import PeftDsError
from .prompts import generate_prompt

FIELDS = ("instruction", "input", "output")


def read_records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            records = json.load(f)
    except FileNotFoundError:
        raise PeftDsError(f"data file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise PeftDsError(f"data file {path} is not valid JSON: {err}") from None
    if not isinstance(records, list) or not records:
        raise PeftDsError(f"data file {path} must hold a non-empty JSON array of records")
    for i, record in enumerate(records):
        missing = [k for k in FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise PeftDsError(f"data file {path}: record {i} lacks field(s) {', '.join(missing)}")
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
