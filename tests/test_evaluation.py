"""`peft-ds evaluate`: LLM-Adapters' evaluation prompt and answer extraction reproduced (faithful) and
fixed (robust); batched generation equal to batch 1 (greedy and 4-beam, SIBO adapter, KV cache); a
2-rank ZeRO-3 run equal to a 1-rank run; bad input refused with one line."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_adapters
from launch import ROOT, free_port

from peft_ds import PeftSpec, apply_peft, save_adapter
from peft_ds.cli import main
from peft_ds.evaluation import extract_answer, generate, is_correct, read_test_set, response_of
from peft_ds.models import build_preset, load_tokenizer_for
from peft_ds.prompts import evaluation_prompt

FIXTURES = os.path.join(ROOT, "peft_ds", "assets", "eval")


# ---- prompt and extraction (reference notes 2.3, 2.5, 2.6) ---------------------------------------------------


def test_response_is_the_text_between_the_first_two_markers():
    assert response_of("prompt ### Response:\n   The answer is 4. ### Response: junk") == "The answer is 4."
    assert response_of("no marker") == ""


@pytest.mark.parametrize("text,expected", [
    ("3 apples and 4 pears make 7", 7.0),  # the last number wins
    ("The total is 1,234.5 dollars", 1234.5),  # commas removed
    ("-3 degrees", -3.0),
    ("It is 5.", 5.0),
    ("no number at all", math.inf),  # counts as wrong
])
def test_faithful_numbers(text, expected):
    assert extract_answer("gsm8k", text) == expected


def test_tolerance_and_missing_numbers():
    assert is_correct("SVAMP", 8.0005, "8.0") and not is_correct("SVAMP", 8.002, "8.0")
    assert is_correct("mawps", 1.8333, "1.8333333333333335")
    assert not is_correct("gsm8k", extract_answer("gsm8k", "none"), "3.0")


def test_faithful_aqua_takes_the_first_capital_anywhere():
    assert extract_answer("AQuA", "Each box holds 3, so the answer is (D).") == "E"  # upstream quirk
    assert extract_answer("AQuA", "the answer is (d)") == ""
    assert extract_answer("AQuA", "Bob") == "B"


@pytest.mark.parametrize("dataset,text,expected", [
    ("boolq", "false, not true", "false"),  # the first match
    ("boolq", "True", ""),  # lower case only
    ("piqa", "solution2 then solution1", "solution2"),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("ARC-Challenge", "answer5?", "answer5"),
    ("hellaswag", "ending4", "ending4"),
    ("winogrande", "neither", ""),  # empty string when none
    ("openbookqa", "answer1 answer4", "answer1"),
])
def test_faithful_commonsense_first_match(dataset, text, expected):
    assert extract_answer(dataset, text) == expected


@pytest.mark.parametrize("dataset,text,expected", [
    ("AQuA", "Each box holds 3, so the answer is (D).", "D"),
    ("AQuA", "Options (B) and (C) fail; the answer is C", "C"),
    ("AQuA", "Checking A) fails, so E) it is", "A"),
    ("AQuA", "Each of them", ""),
    ("gsm8k", "The answer is 5. Check: 5 + 1 = 6", 5.0),
    ("gsm8k", "We have 3, 4 and 1,250 items", 1250.0),
    ("gsm8k", "nothing", math.inf),
    ("boolq", "The answer is True", "true"),
    ("piqa", "solution1 looks odd; the answer is solution2", "solution2"),
])
def test_robust_extraction(dataset, text, expected):
    assert extract_answer(dataset, text, "robust") == expected


# ---- batched generation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sibo_model():
    torch.manual_seed(0)
    model = build_preset("tiny-llama").eval()
    apply_peft(model, PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.3))
    randomize_adapters(model, std=0.2)
    return model.eval()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batch_4_equals_batch_1(sibo_model, num_beams):
    tokenizer = load_tokenizer_for("tiny-llama")
    records = read_test_set(FIXTURES, "AQuA")[:3] + read_test_set(FIXTURES, "boolq")[:3]
    prompts = [evaluation_prompt(r["instruction"]) for r in records]
    lengths = {len(tokenizer.encode(p)) for p in prompts}
    assert len(lengths) >= 4  # different lengths: left padding is exercised
    kwargs = dict(num_beams=num_beams, max_new_tokens=10, skip_special_tokens=False)
    one = generate(sibo_model, tokenizer, prompts, batch_size=1, **kwargs)
    four = generate(sibo_model, tokenizer, prompts, batch_size=4, **kwargs)
    assert one == four
    for dataset in ("AQuA", "boolq"):
        for mode in ("faithful", "robust"):
            assert [extract_answer(dataset, response_of(t), mode) for t in one] == \
                   [extract_answer(dataset, response_of(t), mode) for t in four]
    assert all(response_of(t) for t in one)  # something was generated after the prompt


def test_cached_generation_equals_uncached_with_sibo(sibo_model):
    tokenizer = load_tokenizer_for("tiny-llama")
    ids = torch.tensor([tokenizer.encode(evaluation_prompt("What is 2 + 3?"))])
    cached = sibo_model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = sibo_model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(sibo_model, tmp_path_factory):
    return save_adapter(sibo_model, str(tmp_path_factory.mktemp("adapter") / "adapter"), base_model="tiny-llama")


ARGS = ["--base", "tiny-llama", "--dataset", "gsm8k,AQuA,piqa", "--data-dir", FIXTURES, "--max-new-tokens", "8",
        "--num-beams", "2", "--batch-size", "2", "--quiet"]


def run_cli(*args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "peft_ds", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "peft_ds", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_rank_zero3_equals_one_rank(adapter_dir, tmp_path):
    one = run_cli("evaluate", *ARGS, "--adapter", adapter_dir, "--out", str(tmp_path / "one.json"))
    assert "average" in one.stdout and "faithful" in one.stdout and "robust" in one.stdout
    run_cli("evaluate", *ARGS, "--adapter", adapter_dir, "--out", str(tmp_path / "two.json"), "--deepspeed",
            os.path.join(ROOT, "ds_configs", "zero3_cpu.json"), nproc=2)
    a, b = rows(tmp_path / "one.jsonl"), rows(tmp_path / "two.jsonl")
    assert len(a) == 18 and a == b  # same outputs, predictions, flags, in order
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["world_size"] == 2 and set(summary["accuracy"]) == {"gsm8k", "AQuA", "piqa", "average"}
    assert [r["id"] for r in a if r["dataset"] == "AQuA"] == list(range(6))


def test_bad_input_is_refused(capsys, tmp_path, adapter_dir):
    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("peft-ds: error:") and message in err[0], err

    base = ["evaluate", "--base", "tiny-llama", "--data-dir", str(tmp_path), "--quiet"]
    fails(base + ["--dataset", "gsm9k"], "unknown dataset 'gsm9k'")
    fails(base + ["--dataset", "gsm8k"], "does not exist")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.json").write_text("[{\"instruction\": ")
    fails(base + ["--dataset", "gsm8k"], "is not valid JSON")
    (tmp_path / "gsm8k" / "test.json").write_text(json.dumps({"instruction": "x"}))
    fails(base + ["--dataset", "gsm8k"], "must be a non-empty JSON array")
    (tmp_path / "gsm8k" / "test.json").write_text(json.dumps([{"instruction": "x", "answer": "four"}]))
    fails(base + ["--dataset", "gsm8k"], "non-numeric answer 'four'")
    (tmp_path / "gsm8k" / "test.json").write_text(json.dumps([{"input": "x", "answer": "4"}]))
    fails(base + ["--dataset", "gsm8k"], "record 0 needs a string 'instruction'")
    fails(["evaluate", "--base", "tiny-gptj", "--adapter", adapter_dir, "--dataset", "AQuA", "--data-dir", FIXTURES],
          "was trained on {'model_type': 'llama'")
    fails(base + ["--dataset", "gsm8k", "--batch-size", "0"], "--batch-size must be >= 1")
    out = tmp_path / "r.json"
    out.write_text("{}")
    fails(["evaluate", "--base", "tiny-llama", "--dataset", "AQuA", "--data-dir", FIXTURES, "--out", str(out)],
          "exists (use --force")
    assert out.read_text() == "{}"


# ---- outputs: never over an input, never after a wasted run, never half-written (issue 14) ----------------------


def _fails_before_loading(monkeypatch, capsys, argv, message):
    """Exit 2, one error line, and neither the model loaded nor anything generated."""
    from peft_ds import evaluation, models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "build_model", never)
    monkeypatch.setattr(evaluation, "generate", never)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-ds: error:") and message in err[0], err


def test_unwritable_out_fails_before_generating(monkeypatch, capsys, tmp_path):
    from faults import read_only_dir

    argv = ["evaluate", "--base", "tiny-llama", "--dataset", "AQuA", "--data-dir", FIXTURES, "--quiet", "--out"]
    with read_only_dir(tmp_path / "ro") as ro:
        _fails_before_loading(monkeypatch, capsys, argv + [os.path.join(ro, "eval", "r.json")],
                              "cannot be written: no new file can be made in")
        assert os.listdir(ro) == []
    (tmp_path / "file").write_text("x")
    _fails_before_loading(monkeypatch, capsys, argv + [str(tmp_path / "file" / "r.json")], "is not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"] and (tmp_path / "file").read_text() == "x"


def test_out_never_replaces_an_input(monkeypatch, capsys, tmp_path, adapter_dir):
    from faults import tree

    data = tmp_path / "data"
    (data / "AQuA").mkdir(parents=True)
    with open(os.path.join(FIXTURES, "AQuA", "test.json"), "rb") as f:
        (data / "AQuA" / "test.json").write_bytes(f.read())
    os.symlink(adapter_dir, tmp_path / "adapter_link")
    argv = ["evaluate", "--base", "tiny-llama", "--adapter", adapter_dir, "--dataset", "AQuA", "--data-dir", str(data),
            "--quiet", "--force", "--out"]
    cases = {os.path.join(adapter_dir, "adapter_config.json"): "lies inside the adapter directory",
             adapter_dir: "is the adapter directory",
             str(tmp_path / "adapter_link" / "results.json"): "lies inside the adapter directory",
             str(data / "AQuA" / ".." / "AQuA" / "test.json"): "is the test set"}
    before = (tree(adapter_dir), tree(data))
    for out, message in cases.items():
        _fails_before_loading(monkeypatch, capsys, argv + [out], message)
        assert (tree(adapter_dir), tree(data)) == before


def test_results_killed_at_every_step_stay_whole(monkeypatch, tmp_path):
    """Each of the summary and its rows file is whole (old or new) at every instant; the summary names
    the sha256 of the rows it goes with; the next run leaves no leftover."""
    import hashlib

    from faults import Killed, kill_at

    from peft_ds.evaluation import evaluate, rows_path

    out = str(tmp_path / "eval" / "results.json")

    def run(limit):
        evaluate("tiny-llama", ["AQuA"], FIXTURES, limit=limit, num_beams=1, max_new_tokens=2, out=out, force=True,
                 progress=False)
        return open(out).read(), open(rows_path(out)).read()

    old = run(2)
    with kill_at(monkeypatch) as seen:
        new = run(1)
    assert old != new and json.loads(new[0])["rows_sha256"] == hashlib.sha256(new[1].encode()).hexdigest()
    for step in range(seen["steps"]):
        for path, text in zip((out, rows_path(out)), old):
            with open(path, "w") as f:
                f.write(text)
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            run(1)
        summary, lines = open(out).read(), open(rows_path(out)).read()
        assert summary in (old[0], new[0]) and lines in (old[1], new[1]), step
        assert run(1) == new and sorted(os.listdir(tmp_path / "eval")) == ["results.json", "results.jsonl"]
