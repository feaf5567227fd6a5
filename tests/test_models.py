"""Tiny presets, local Hugging Face model directories, the adapter directory, the CLI's error lines."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, ROOT, randomize_adapters, random_batch

import peft_ds
from peft_ds import PeftDsError
from peft_ds.adapter_io import load_adapter, save_adapter
from peft_ds.models import build_preset, load_model_dir, write_preset


@pytest.mark.parametrize("name", ARCHS)
def test_preset_directory_round_trip(name, tmp_path):
    write_preset(name, str(tmp_path / name))
    files = set(os.listdir(tmp_path / name))
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= files
    model, tokenizer = load_model_dir(str(tmp_path / name))
    assert type(model).__name__ == ("LlamaForCausalLM" if name == "tiny-llama" else "GPTJForCausalLM")
    ids, _ = random_batch()
    assert torch.equal(model.eval()(input_ids=ids).logits, build_preset(name).eval()(input_ids=ids).logits)
    text = "Below is an instruction.  \n                ### Response:\n                The answer is 42."
    assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == text
    assert tokenizer.encode("x")[0] == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_preset_is_seeded():
    a, b = build_preset("tiny-llama"), build_preset("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_model_dir_errors(tmp_path):
    with pytest.raises(PeftDsError, match="does not exist"):
        load_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftDsError, match="no config.json"):
        load_model_dir(str(tmp_path / "empty"))
    d = tmp_path / "llama"
    write_preset("tiny-llama", str(d))
    os.remove(d / "tokenizer.model")
    with pytest.raises(PeftDsError, match="no tokenizer.model"):
        load_model_dir(str(d))
    os.remove(d / "model.safetensors")
    with pytest.raises(PeftDsError, match="no safetensors weights"):
        load_model_dir(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(PeftDsError, match="not valid JSON"):
        load_model_dir(str(d))


@pytest.mark.parametrize("name", ARCHS)
def test_adapter_directory_round_trip_with_generate(name, tmp_path):
    spec = peft_ds.PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.2, sibo_learnable=True)
    model = peft_ds.apply_peft(build_preset(name).eval(), spec)
    randomize_adapters(model, std=0.2)
    save_adapter(model, str(tmp_path / "a"), base_model=name)
    fresh = load_adapter(build_preset(name).eval(), str(tmp_path / "a"))
    ids, mask = random_batch(pad_left=[0, 3])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), fresh.generate(ids, **kwargs))
    other = "tiny-gptj" if name == "tiny-llama" else "tiny-llama"
    with pytest.raises(PeftDsError, match="was trained on"):
        load_adapter(build_preset(other), str(tmp_path / "a"))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peft_ds", *args], capture_output=True, text=True, cwd=cwd or ROOT)


def test_cli_preset_and_errors(tmp_path):
    r = _cli("preset", "tiny-gptj", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g" / "model.safetensors").exists()
    before = (tmp_path / "g" / "model.safetensors").stat().st_mtime_ns
    r = _cli("preset", "tiny-gptj", str(tmp_path / "g"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("peft-ds: error:") and "exists" in r.stderr
    assert (tmp_path / "g" / "model.safetensors").stat().st_mtime_ns == before
    r = _cli("preset", "tiny-bert", str(tmp_path / "b"))
    assert r.returncode == 2 and "unknown preset 'tiny-bert'" in r.stderr and not (tmp_path / "b").exists()
    r = _cli("demo", "--sibo-lambda", "1.5", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "sibo_lambda must be in [0, 1)" in r.stderr and not (tmp_path / "d").exists()
    r = _cli("smoothness", "--model", "tiny-llama", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_demo_runs(tmp_path):
    r = _cli("demo", "--num-examples", "4", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "trainable 405,504 of" in r.stdout and "up_proj" in r.stdout
    assert "layer" in r.stdout and (tmp_path / "demo" / "smoothness.png").exists()


def test_gptj_directory_with_hf_tokenizer_files(tmp_path):
    """A GPT-J directory carries tokenizer.json (no sentencepiece model): AutoTokenizer, local files only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peft_ds.data import tokenize_record

    d = tmp_path / "gptj"
    write_preset("tiny-gptj", str(d))
    os.remove(d / "tokenizer.model")
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["Below is an instruction that describes a task.", "The answer is 42."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(d)
    model, tokenizer = load_model_dir(str(d))
    assert type(tokenizer).__name__ != "SentencePieceTokenizer" and tokenizer.pad_token_id == 0
    example = tokenize_record(tokenizer, {"instruction": "What is 6 x 7?", "input": "", "output": "The answer is 42."},
                              cutoff_len=512, train_on_inputs=False)
    assert example["input_ids"][-1] == tokenizer.eos_token_id and -100 in example["labels"]
