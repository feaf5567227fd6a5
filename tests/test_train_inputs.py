"""Bad input to `peft-ds train` gives one clear error line and exit 2 before any rank starts, and
leaves no output behind; the README demo run trains (loss falls by at least 30%)."""

import json
import os
import pathlib
import sys

import pytest
from launch import ROOT, losses, peft_ds, write_config

from peft_ds import distributed
from peft_ds.cli import main
from peft_ds.models import write_preset


@pytest.fixture
def base(tmp_path):
    return write_config(tmp_path / "run.yaml", tmp_path / "out")


def _fails(capsys, tmp_path, argv, message):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("peft-ds: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_data_file_errors(capsys, tmp_path, base):
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"data.train_file={tmp_path}/none.json"],
           "does not exist")
    (tmp_path / "bad.json").write_text("[{")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"data.train_file={tmp_path}/bad.json"],
           "is not valid JSON")
    (tmp_path / "fields.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"data.train_file={tmp_path}/fields.json"],
           "record 0 lacks field(s) input")
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": "w " * 400, "input": "", "output": "x"}] * 9))
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"data.train_file={tmp_path}/long.json",
                              "--set", "data.train_on_inputs=false"], "no training records left")


def test_config_and_world_size_errors(capsys, tmp_path, base):
    _fails(capsys, tmp_path, ["train", base, "--set", "train.warmup=3"], "unknown config key train.warmup")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "3"], "world size 3 does not divide the global batch")
    _fails(capsys, tmp_path, ["train", base, "--set", f"deepspeed={tmp_path}/none.json"], "does not exist")


def test_model_directory_errors(capsys, tmp_path, base):
    model_dir = tmp_path / "model"
    write_preset("tiny-llama", str(model_dir))
    capsys.readouterr()  # the preset writer's progress output
    os.remove(model_dir / "tokenizer.model")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"model.name_or_path={model_dir}"],
           "has no tokenizer.model")
    os.remove(model_dir / "model.safetensors")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"model.name_or_path={model_dir}"],
           "has no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"model.name_or_path={tmp_path}/nothing"],
           "neither a preset")


def test_error_is_one_line_from_the_command(tmp_path, base):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = peft_ds("train", base, "--nproc", "2", "--set", "train.global_batch_size=7",
                env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 2
    assert r.stderr.strip() == ("peft-ds: error: train.global_batch_size 7 is not a multiple of "
                                "train.micro_batch_size 2")
    assert list(scratch.iterdir()) == []  # the directory for the ranks' checked inputs is gone too


@pytest.mark.parametrize("method,val", [({"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2}, 20),
                                        ({"method": "bilora", "r": 4, "alpha": 8}, 0)], ids=["lora-val", "bilora"])
def test_ranks_read_back_the_commands_checked_inputs(tmp_path, method, val):
    """`peft-ds train --nproc` checks and tokenizes once and hands its ranks the result (train.save_prepared):
    read back, every data set (BiLoRA's D1 and D2 too) and every other value equal what prepare returned."""
    from peft_ds import train
    from peft_ds.config import load_config

    config = load_config(write_config(tmp_path / "run.yaml", tmp_path / "out", method=method), [])
    config.data.val_set_size = val
    run = train.prepare(config, 2)
    (tmp_path / "handed").mkdir()
    train.save_prepared(run, str(tmp_path / "handed"))
    back = train.load_prepared(str(tmp_path / "handed"), config)
    assert back.keys() == run.keys()
    for key in run:
        if key in ("train_set", "val_set"):
            assert (back[key] is None) == (run[key] is None)
            assert run[key] is None or [back[key][i] for i in range(len(back[key]))] == run[key].to_list()
        elif key == "levels":
            assert (back[key] is None) == (run[key] is None)
            for a, b in zip(back[key] or (), run[key] or ()):
                assert [a[i] for i in range(len(a))] == b.to_list() and len(a) > 0
        elif key == "tokenizer":
            assert back[key].encode("x + 1 = 2") == run[key].encode("x + 1 = 2")
        else:
            assert back[key] == run[key], key
    assert (run["levels"] is not None) == (method["method"] == "bilora") and (run["val_set"] is not None) == (val > 0)


@pytest.mark.slow
def test_readme_demo_run_trains(tmp_path):
    """The README's main job (configs/demo_tiny_llama_lora_sibo.yaml, 2 ranks, ZeRO-3 on the CPU)."""
    out = tmp_path / "demo"
    r = peft_ds("train", os.path.join(ROOT, "configs", "demo_tiny_llama_lora_sibo.yaml"), "--nproc", "2",
                "--set", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("checkpoint: ", "adapter:    ", "loss plot:  "):
        assert line + str(out) in r.stdout
    curve = losses(out)
    first, last = curve[1], curve[max(curve)]
    assert last <= 0.7 * first, (first, last)
    assert (out / "loss.png").exists() and (out / "adapter" / "adapter.safetensors").exists()
    with open(out / "metrics.jsonl") as f:
        assert any("val_loss" in json.loads(line) for line in f)


@pytest.mark.parametrize("variable,message", [
    ("SLURM_STEP_NUM_TASKS", "srun task without SLURM_PROCID"),
    ("OMPI_COMM_WORLD_SIZE", "started by MPI (OMPI_COMM_WORLD_SIZE=4) but mpi4py is not installed"),
    ("PMI_SIZE", "started by MPI (PMI_SIZE=4) but mpi4py is not installed"),
])
def test_sibling_tasks_that_cannot_tell_their_rank_are_refused(capsys, tmp_path, base, monkeypatch, variable, message):
    """A process started as one of several srun / mpirun tasks must find its rank or stop: training
    alone beside its siblings would write the same output directory."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "4")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as on a machine without it
    monkeypatch.setattr(distributed, "_discovered", None)
    _fails(capsys, tmp_path, ["train", base], message)


# ---- issue 14: refused before any rank starts, one line, exit 2, the output directory untouched -------


def snapshot(path):
    """Every file's bytes and every directory under `path` (None when it does not exist)."""
    path = str(path)
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return f.read()
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), path) + "/"] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return found


def refused(capsys, argv, message, out):
    """`argv` exits 2 with one `peft-ds: error:` line holding `message`; `out` is as it was."""
    before = snapshot(out)
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("peft-ds: error:") and message in err[0], err
    assert snapshot(out) == before
    return err[0]


def records(n=16, **fields):
    rows = [{"instruction": f"add {i} and 1", "input": "", "output": f"{i + 1}", "answer": i + 1} for i in range(n)]
    rows[3].update(fields)
    return rows


@pytest.mark.parametrize("fields,message", [
    ({"instruction": None}, "record 3 field instruction must be a string, got null"),
    ({"input": 7}, "record 3 field input must be a string, got 7"),
    ({"output": 1.5}, "record 3 field output must be a string, got 1.5"),
    ({"output": ["a", "b"]}, "record 3 field output must be a string, got [\"a\", \"b\"]"),
], ids=["null", "int", "float", "list"])
@pytest.mark.parametrize("which", ["train_file", "validation_file"])
def test_non_string_fields_are_refused(capsys, tmp_path, base, fields, message, which):
    """A null or a number was trained on as the text "None" / "7"."""
    (tmp_path / "good.json").write_text(json.dumps(records()))
    (tmp_path / "bad.json").write_text(json.dumps(records(**fields)))
    files = {"train_file": tmp_path / "good.json", "validation_file": tmp_path / "good.json",
             which: tmp_path / "bad.json"}
    line = refused(capsys, ["train", base, "--nproc", "2", "--set", f"data.train_file={files['train_file']}",
                            "--set", f"data.validation_file={files['validation_file']}"], message, tmp_path / "out")
    assert f"data file {tmp_path / 'bad.json'}: " in line


def test_numeric_answer_field_is_accepted(capsys, tmp_path, base):
    (tmp_path / "good.json").write_text(json.dumps(records()))
    assert main(["check", base, "--world-size", "2", "--set", f"data.train_file={tmp_path / 'good.json'}"]) == 0
    assert "16 training records" in capsys.readouterr().out


NOT_UTF8 = b'[{"instruction": "caf\xe9", "input": "", "output": "1"}]'  # Latin-1, not UTF-8


@pytest.mark.parametrize("case,message", [
    ("data_latin1", "data file {tmp}/latin1.json is not UTF-8 text (byte 21)"),
    ("validation_latin1", "data file {tmp}/latin1.json is not UTF-8 text (byte 21)"),
    ("data_directory", "data file {tmp}/dir is a directory, not a file"),
    ("deepspeed_latin1", "DeepSpeed config {tmp}/latin1.json is not UTF-8 text (byte 21)"),
    ("config_latin1", "run config {tmp}/latin1.yaml is not UTF-8 text"),
    ("config_directory", "run config {tmp}/dir is a directory, not a file"),
], ids=["data_latin1", "validation_latin1", "data_directory", "deepspeed_latin1", "config_latin1", "config_directory"])
def test_unreadable_files_are_one_line(capsys, tmp_path, base, case, message):
    (tmp_path / "latin1.json").write_bytes(NOT_UTF8)
    (tmp_path / "latin1.yaml").write_bytes(b"output_dir: caf\xe9\n")
    (tmp_path / "dir").mkdir()
    argv = {"data_latin1": ["train", base, "--set", f"data.train_file={tmp_path}/latin1.json"],
            "validation_latin1": ["train", base, "--set", f"data.validation_file={tmp_path}/latin1.json"],
            "data_directory": ["train", base, "--set", f"data.train_file={tmp_path}/dir"],
            "deepspeed_latin1": ["train", base, "--set", f"deepspeed={tmp_path}/latin1.json"],
            "config_latin1": ["train", str(tmp_path / "latin1.yaml")],
            "config_directory": ["train", str(tmp_path / "dir")]}[case]
    refused(capsys, argv[:2] + ["--nproc", "2"] + argv[2:], message.format(tmp=tmp_path), tmp_path / "out")


@pytest.mark.parametrize("deepspeed,dtype,message", [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "auto",
     "the DeepSpeed config enables both bf16 and fp16 and model.dtype is auto"),
    ({"zero_optimization": {"stage": 5}}, "fp32", "zero_optimization.stage must be one of 0, 1, 2, 3, got 5"),
    ({"zero_optimization": {"stage": "three"}}, "fp32",
     "zero_optimization.stage must be one of 0, 1, 2, 3, got 'three'"),
    ({"zero_optimization": {"stage": True}}, "fp32", "zero_optimization.stage must be one of 0, 1, 2, 3, got True"),
    ({"zero_optimization": 3}, "fp32", "zero_optimization must be a JSON object, got 3"),
], ids=["bf16_and_fp16", "stage_5", "stage_three", "stage_true", "zero_not_object"])
def test_deepspeed_config_contradictions(capsys, tmp_path, base, deepspeed, dtype, message):
    raw = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")))
    for key, value in deepspeed.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    refused(capsys, ["train", base, "--nproc", "2", "--set", f"deepspeed={tmp_path}/ds.json",
                     "--set", f"model.dtype={dtype}"], message, tmp_path / "out")


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("# nothing but a comment\n\n", "is empty"),
    ("{}\n", "is empty"),
    ("- model\n- data\n", "must be a YAML mapping of sections, got a list"),
    ("just a string\n", "must be a YAML mapping of sections, got a str"),
], ids=["zero_bytes", "comments_only", "empty_mapping", "list", "scalar"])
@pytest.mark.parametrize("command", ["train", "check"])
def test_empty_or_non_mapping_config_is_refused(capsys, tmp_path, text, message, command, monkeypatch):
    """A 0-byte YAML started a full run on the defaults (in runs/default); a list was a traceback."""
    monkeypatch.chdir(tmp_path)  # the defaults' output_dir, runs/default, would land here
    (tmp_path / "run.yaml").write_text(text)
    argv = [command, str(tmp_path / "run.yaml"), "--set", "train.lr=1e-3"]
    line = refused(capsys, argv + (["--nproc", "2"] if command == "train" else ["--world-size", "2"]), message,
                   tmp_path / "runs")
    assert f"run config {tmp_path / 'run.yaml'} " in line


def test_output_dir_that_is_a_file_is_refused(capsys, tmp_path, base):
    (tmp_path / "out").write_text("notes\n")
    refused(capsys, ["train", base, "--nproc", "2"], "output_dir " + str(tmp_path / "out") + " exists and is not a "
            "directory", tmp_path / "out")
    refused(capsys, ["train", base, "--nproc", "2", "--set", f"output_dir={tmp_path}/out/run"],
            f"output_dir {tmp_path}/out/run cannot be made: {tmp_path}/out is not a directory", tmp_path / "out")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can create files in, root included (tests/faults.py)."""
    from faults import read_only_dir as read_only

    with read_only(tmp_path / "shared") as path:
        yield pathlib.Path(path)


@pytest.mark.parametrize("command", ["train", "check"])
def test_output_dir_not_writable_is_refused(capsys, tmp_path, base, read_only_dir, command):
    out = read_only_dir / "run" / "a"
    argv = [command, base, "--set", f"output_dir={out}"] + (["--nproc", "2"] if command == "train"
                                                             else ["--world-size", "2"])
    refused(capsys, argv, f"output_dir {out} is not writable: cannot create a file in {read_only_dir}", read_only_dir)


@pytest.mark.parametrize("override,message", [
    ("method.target_modules=[q_proj,nonexistent]",
     "target module(s) nonexistent not found in the model's decoder layers"),
    ("method.target_modules=[mlp]", "target module 'mlp' is a LlamaMLP, not a Linear"),
    ("method.sibo_sites=[nowhere]", "SIBO site 'nowhere' not found in the model's decoder layers"),
    ("method.sibo_sites=[o_proj]", "SIBO site 'o_proj' is not among target_modules"),
], ids=["missing_target", "not_linear", "missing_sibo_site", "site_not_adapted"])
def test_targets_are_checked_before_ranks_start(capsys, tmp_path, base, override, message):
    """Found only once ranks ran before, leaving config.yaml, ds_config.json and an empty checkpoints/."""
    refused(capsys, ["train", base, "--nproc", "2", "--set", "method.sibo_lambda=0.1", "--set", override], message,
            tmp_path / "out")


def test_leftovers_of_a_run_that_never_stepped_are_no_run(capsys, tmp_path, base):
    """config.yaml, ds_config.json, an empty checkpoints/ and a metrics.jsonl without a step (what a
    failure before the first step left) neither block a new run nor count as one."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "ds_config.json"):
        (out / name).write_text("{}\n")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "grad_check": [4, 4]}) + "\n")
    assert main(["check", base, "--world-size", "2"]) == 0, capsys.readouterr().err
    assert "resume False" in capsys.readouterr().out
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, "lr": 0.0}) + "\n")
    refused(capsys, ["check", base, "--world-size", "2"], "already holds a run", out)


@pytest.mark.slow
def test_failure_after_the_checks_leaves_nothing(tmp_path):
    """DeepSpeed rejects a config key only once a rank builds the engine: the output directory must not
    be left holding config.yaml, ds_config.json and checkpoints/ that refuse a rerun."""
    raw = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")))
    raw["zero_optimization"]["not_a_deepspeed_key"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "out")
    r = peft_ds("train", cfg, "--set", f"deepspeed={tmp_path}/ds.json")
    assert r.returncode != 0 and "not_a_deepspeed_key" in r.stdout + r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists() or snapshot(tmp_path / "out") == {}
    r = peft_ds("check", cfg, "--world-size", "1")
    assert r.returncode == 0, r.stderr
