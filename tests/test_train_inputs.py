"""Bad input to `peft-ds train` gives one clear error line and exit 2 before any rank starts, and
leaves no output behind; the README demo run trains (loss falls by at least 30%)."""

import json
import os
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
           "has no safetensors weights")
    _fails(capsys, tmp_path, ["train", base, "--nproc", "2", "--set", f"model.name_or_path={tmp_path}/nothing"],
           "neither a preset")


def test_error_is_one_line_from_the_command(tmp_path, base):
    r = peft_ds("train", base, "--nproc", "2", "--set", "train.global_batch_size=7")
    assert r.returncode == 2
    assert r.stderr.strip() == ("peft-ds: error: train.global_batch_size 7 is not a multiple of "
                                "train.micro_batch_size 2")


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
