"""Training data as LLM-Adapters builds it: prompt, EOS rule, cutoff, train_on_inputs masking, left
padding to a multiple of 8, the seeded validation split, the global batch order."""

import json

import pytest

from peft_ds import PeftDsError
from peft_ds.config import load_config
from peft_ds.data import (IGNORE_INDEX, build_datasets, collate, global_batch_indices, read_records,
                          tokenize_record)
from peft_ds.models import TINY_TOKENIZER
from peft_ds.prompts import generate_prompt
from peft_ds.tokenizer import SentencePieceTokenizer

TOK = SentencePieceTokenizer(TINY_TOKENIZER)
RECORD = {"instruction": "Tom has 3 apples and buys 4 more. How many apples does he have?", "input": "",
          "output": "3 + 4 = 7.\nThe answer is 7.", "answer": "7.0"}


def test_tokenize_record_eos_and_masking():
    full = TOK.encode(generate_prompt(RECORD))
    example = tokenize_record(TOK, RECORD, cutoff_len=256, train_on_inputs=True)
    assert example["input_ids"] == full + [TOK.eos_token_id] and example["input_ids"][0] == TOK.bos_token_id
    assert example["labels"] == example["input_ids"]
    masked = tokenize_record(TOK, RECORD, cutoff_len=256, train_on_inputs=False)
    user = TOK.encode(generate_prompt({**RECORD, "output": ""}))
    assert masked["labels"][: len(user)] == [IGNORE_INDEX] * len(user)
    assert masked["labels"][len(user):] == masked["input_ids"][len(user):]
    assert TOK.decode(masked["input_ids"][len(user):-1]).endswith("The answer is 7.")
    # cutoff: truncated, and no EOS when the cut fills cutoff_len
    cut = tokenize_record(TOK, RECORD, cutoff_len=10, train_on_inputs=True)
    assert cut["input_ids"] == full[:10] and TOK.eos_token_id not in cut["input_ids"]


def test_collate_left_pads_to_multiple_of_8():
    a = {"input_ids": [1, 5, 6], "labels": [1, 5, 6]}
    b = {"input_ids": list(range(1, 11)), "labels": [IGNORE_INDEX] * 4 + list(range(5, 11))}
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [0] * 13 + [1, 5, 6]
    assert batch["attention_mask"][0].tolist() == [0] * 13 + [1, 1, 1]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 13 + [1, 5, 6]
    assert batch["labels"][1].tolist()[6:] == b["labels"]


def test_seeded_split_and_order(tmp_path):
    records = [dict(RECORD, instruction=f"question {i}") for i in range(50)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    config = load_config(None, [f"data.train_file={path}", "data.val_set_size=10", "data.cutoff_len=64"])
    train_a, val_a = build_datasets(config.data, TOK, seed=42)
    train_b, val_b = build_datasets(config.data, TOK, seed=42)
    train_c, val_c = build_datasets(config.data, TOK, seed=7)
    assert len(train_a) == 40 and len(val_a) == 10
    assert val_a["input_ids"] == val_b["input_ids"] and val_a["input_ids"] != val_c["input_ids"]
    steps = [global_batch_indices(40, 8, seed=42, step=s) for s in range(10)]
    assert sorted(sum(steps[:5], [])) == list(range(40))  # one epoch covers every record once
    assert steps[:5] != steps[5:]  # a new order in the next epoch
    assert steps == [global_batch_indices(40, 8, seed=42, step=s) for s in range(10)]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON array"),
    ('{"a": 1}', "non-empty JSON array"),
    ('[{"instruction": "x", "input": ""}]', "record 0 lacks field\\(s\\) output"),
    ('[1, 2]', "record 0 is not a JSON object"),
])
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PeftDsError, match=message):
        read_records(str(path))


def test_empty_after_filtering(tmp_path):
    long_prompt = dict(RECORD, instruction="word " * 300)
    path = tmp_path / "long.json"
    path.write_text(json.dumps([long_prompt] * 4))
    config = load_config(None, [f"data.train_file={path}", "data.val_set_size=0", "data.cutoff_len=32",
                                "data.train_on_inputs=false"])
    with pytest.raises(PeftDsError, match="no training records left"):
        build_datasets(config.data, TOK, seed=1)
