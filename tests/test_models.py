"""Tiny presets, local Hugging Face model directories, the adapter directory, the CLI's error lines."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, ROOT, randomize_adapters, random_batch
from launch import bin_model_dir

import peft_ds
from peft_ds import PeftDsError
from peft_ds.adapter_io import load_adapter, save_adapter
from peft_ds import models
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
    with pytest.raises(PeftDsError, match=r"has no weights \(model.safetensors\[.index.json\] or pytorch_model.bin"):
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


# ---- kills, failed loads, permissions, outputs over inputs (issue 14) -----------------------------------------


def _lora_model(seed):
    model = peft_ds.apply_peft(build_preset("tiny-llama").eval(), peft_ds.PeftSpec(method="lora", r=4, alpha=8))
    randomize_adapters(model, seed=seed, std=0.2)
    return model


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_adapter_export_killed_at_every_step_keeps_the_previous_adapter(tmp_path, monkeypatch, swap):
    from faults import Killed, kill_at, without_exchange

    from peft_ds import outputs
    from peft_ds.adapter_io import read_adapter

    def tree(path):  # the config (with a sha256 per tensor), once every tensor matches its checksum
        return read_adapter(path)[0]

    if swap == "two renames":
        without_exchange(monkeypatch)
    out = str(tmp_path / "adapter")
    old_model, new_model = _lora_model(1), _lora_model(2)
    save_adapter(old_model, out, base_model="tiny-llama")
    old = tree(out)
    save_adapter(new_model, out, base_model="tiny-llama")
    new = tree(out)
    assert old != new
    with kill_at(monkeypatch) as seen:
        save_adapter(old_model, out, base_model="tiny-llama")
    for step in range(seen["steps"]):
        save_adapter(old_model, out, base_model="tiny-llama")
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            save_adapter(new_model, out, base_model="tiny-llama")
        if not os.path.exists(out):  # killed between the two renames: the next writer puts it back
            assert swap == "two renames" and outputs.recover(out)
        assert tree(out) in (old, new), step
        save_adapter(new_model, out, base_model="tiny-llama")
        assert tree(out) == new and os.listdir(tmp_path) == ["adapter"]


def test_failed_load_adapter_leaves_the_model_as_it_was(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from peft_ds.adapter_io import CONFIG, WEIGHTS

    good = _lora_model(3)
    save_adapter(good, str(tmp_path / "good"), base_model="tiny-llama")
    ids, _ = random_batch()
    base_logits = build_preset("tiny-llama").eval()(input_ids=ids).logits

    def broken(name, edit_config=None, edit_state=None):
        d = tmp_path / name
        d.mkdir()
        config = json.loads((tmp_path / "good" / CONFIG).read_text())
        state = load_file(str(tmp_path / "good" / WEIGHTS))
        if edit_state:
            edit_state(state, config)
        if edit_config:
            edit_config(config)
        save_file(state, str(d / WEIGHTS))
        (d / CONFIG).write_text(json.dumps(config))
        return str(d)

    key = "model.layers.0.self_attn.q_proj.lora_A"

    def drop(state, config):
        del state[key], config["sha256"][key]

    def tamper(state, config):
        state[key] = state[key] + 1

    cases = {broken("shape", edit_config=lambda c: c["peft_spec"].update(r=8)):
             "has shape (4, 256), the model expects (8, 256)",
             broken("missing", edit_state=drop): f"missing 1 key(s), e.g. {key}",
             broken("checksum", edit_state=tamper): "fails its sha256 checksum"}
    model = build_preset("tiny-llama").eval()
    for adapter_dir, message in cases.items():
        with pytest.raises(PeftDsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_adapter(model, adapter_dir)
        assert getattr(model, "peft_spec", None) is None
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    load_adapter(model, str(tmp_path / "good"))  # the same model takes a correct adapter afterwards
    assert torch.equal(model(input_ids=ids).logits, good(input_ids=ids).logits)


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_adapter_and_preset_modes_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        save_adapter(_lora_model(4), str(tmp_path / "adapter"), base_model="tiny-llama")
        r = _cli("preset", "tiny-gptj", str(tmp_path / "preset"))
        assert r.returncode == 0, r.stderr
    finally:
        os.umask(previous)
    from faults import assert_modes_follow

    assert_modes_follow(mask, tmp_path / "adapter", tmp_path / "preset")
    assert {"adapter.safetensors", "adapter_config.json"} == set(os.listdir(tmp_path / "adapter"))
    assert "model.safetensors" in os.listdir(tmp_path / "preset")


def test_preset_force_replaces_symlinks_never_their_targets(tmp_path):
    """A directory of links to another model's files: --force replaces the links, the files stay."""
    from faults import tree

    write_preset("tiny-llama", str(tmp_path / "shared"))
    shared = tree(tmp_path / "shared")
    (tmp_path / "links").mkdir()
    for name in shared:
        os.symlink(tmp_path / "shared" / name, tmp_path / "links" / name)
    r = _cli("preset", "tiny-gptj", str(tmp_path / "links"), "--force")
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "shared") == shared
    assert not os.path.islink(tmp_path / "links" / "model.safetensors")
    assert load_model_dir(str(tmp_path / "links"))[0].config.model_type == "gptj"


def test_smoothness_out_never_replaces_its_data(tmp_path, capsys):
    from peft_ds.cli import main

    from conftest import ROOT as root

    out = tmp_path / "out"
    out.mkdir()
    data = out / "smoothness.json"
    with open(os.path.join(root, "peft_ds", "assets", "math_sample.json"), "rb") as f:
        data.write_bytes(f.read())
    before = data.read_bytes()
    assert main(["smoothness", "--model", "tiny-llama", "--data", str(data), "--num-examples", "2", "--out",
                 str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-ds: error: --out ") and "is the data file" in err[0], err
    assert data.read_bytes() == before and os.listdir(out) == ["smoothness.json"]


# ---- the papers' base models: PyTorch .bin weights ------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("shards", [1, 3])
def test_bin_model_directories_load_as_their_safetensors(name, shards, tmp_path):
    """pytorch_model.bin, or .bin shards with their index, as LLaMA-1-era conversions and GPT-J-6B ship:
    checked, their shapes read from the pickles alone, and loaded (weights_only) to the same weights."""
    st = write_preset(name, str(tmp_path / "st"))
    b = bin_model_dir(st, tmp_path / "bin", shards=shards)
    assert not any(f.endswith(".safetensors") for f in os.listdir(b))
    assert models.check_model_dir(b)["model_type"] == models.check_model_dir(st)["model_type"]
    assert models.weight_shapes(b) == models.weight_shapes(st)
    ours, theirs = models.build_model(b), models.build_model(st)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


def test_bin_shard_that_is_not_a_plain_state_dict_is_refused_in_one_line(tmp_path):
    st = write_preset("tiny-llama", str(tmp_path / "st"))
    b = bin_model_dir(st, tmp_path / "bin", shards=2)
    shard = os.path.join(b, "pytorch_model-00002-of-00002.bin")
    cases = {
        "a pickled module": (torch.nn.Linear(2, 2), "not a plain state dict that loads with weights_only=True"),
        "a checkpoint dict": ({"model": {"w": torch.zeros(1)}, "step": 3}, "not a plain state dict (parameter names "
                                                                           "to tensors): it holds a dict with dict"),
        "a list": ([torch.zeros(1)], "it holds a list"),
    }
    for label, (value, message) in cases.items():
        torch.save(value, shard)
        with pytest.raises(PeftDsError, match=re.escape(message)) as err:
            models.check_model_dir(b)
        assert "\n" not in str(err.value) and shard in str(err.value), label
    with open(shard, "wb") as f:
        f.write(b"half a download")
    with pytest.raises(PeftDsError, match="not a plain state dict that loads with weights_only=True"):
        models.check_model_dir(b)
    os.remove(shard)
    with pytest.raises(PeftDsError, match="names weight shard pytorch_model-00002-of-00002.bin, which is not there"):
        models.check_model_dir(b)


def test_evaluate_and_smoothness_take_a_bin_base(tmp_path):
    import json

    from peft_ds.cli import main
    from peft_ds.evaluation import evaluate

    st = write_preset("tiny-llama", str(tmp_path / "st"))
    b = bin_model_dir(st, tmp_path / "bin", shards=2)
    data = os.path.join(ROOT, "peft_ds", "assets", "eval")
    ours, theirs = (evaluate(base, ["SVAMP"], data, limit=2, num_beams=1, max_new_tokens=4, progress=False)
                    for base in (b, st))
    assert ours["accuracy"] == theirs["accuracy"]
    curves = []
    for base, out in ((b, tmp_path / "smooth_bin"), (st, tmp_path / "smooth_st")):
        assert main(["smoothness", "--model", base, "--out", str(out), "--num-examples", "4"]) == 0
        curves.append(json.loads((out / "smoothness.json").read_text())["curves"][base])
    assert curves[0] == curves[1]
