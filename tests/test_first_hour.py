"""A new user's first hour: the README's PATH step, every command and option explained with its
default, no DeepSpeed accelerator warning from commands that start no backend, and the block of next
commands a finished run prints, run as printed (one provenance layout, an evaluation summary that
records its settings)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from launch import ROOT, losses, peft_ds, write_config

from peft_ds.cli import build_parser

VENV_BIN = os.path.dirname(sys.executable)


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_subcommand_and_option_is_explained():
    missing = []
    for name, sub in _subparsers().items():
        if not sub.description:
            missing.append(f"{name}: no description")
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = (action.help or "").lower()
            if not text:
                missing.append(f"{name} {action.option_strings or action.dest}: no help")
            elif (action.option_strings and not action.required and action.nargs != 0
                  and "default" not in text and "repeatable" not in text):
                missing.append(f"{name} {action.option_strings[0]}: help does not give the default")
    assert not missing, "\n".join(missing)


def test_readme_puts_peft_ds_on_path_before_its_first_command():
    text = open(os.path.join(ROOT, "README.md")).read()
    activate = text.index("source .venv/bin/activate")
    first_command = re.search(r"^peft-ds ", text, re.M).start()
    assert activate < first_command
    assert "make test-fast" in text and '-m "not slow"' in open(os.path.join(ROOT, "Makefile")).read()
    r = subprocess.run([os.path.join(VENV_BIN, "peft-ds"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "plan" in r.stdout and "consolidate" in r.stdout


def test_commands_without_a_backend_print_no_deepspeed_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    runs = [peft_ds("preset", "tiny-gptj", str(tmp_path / "g"), env=env),
            peft_ds("check", os.path.join(ROOT, "configs", "demo_tiny_llama_lora_sibo.yaml"), "--world-size", "2",
                    "--set", f"output_dir={tmp_path / 'run'}", env=env),
            peft_ds("consolidate", str(tmp_path / "nothing"), "--out", str(tmp_path / "c"), env=env)]
    assert [r.returncode for r in runs] == [0, 0, 2]
    for r in runs:
        assert "accelerator" not in (r.stdout + r.stderr).lower(), r.stderr


@pytest.mark.slow
def test_a_finished_run_prints_its_losses_and_next_commands_that_run_as_printed(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", out, max_steps=3)
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:  # a validation split, as the demo has
        f.write(text.replace("val_set_size: 0", "val_set_size: 16"))
    r = peft_ds("train", config, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    final = next(line for line in lines if line.startswith("final training loss"))
    assert f"final training loss {losses(out)[3]:.4f} (step 3), validation loss" in final
    commands = [line.strip() for line in lines[lines.index("next:") + 1:] if line.startswith("  peft-ds ")]
    assert [c.split()[1] for c in commands] == ["consolidate", "evaluate"]
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"])
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, command + "\n" + done.stderr[-3000:]
    trained = json.loads((out / "adapter" / "adapter_config.json").read_text())
    consolidated = json.loads((out / "consolidated" / "adapter_config.json").read_text())
    assert trained["source"].keys() == consolidated["source"].keys() and "transforms" in trained
    assert (trained["source"]["tool"], consolidated["source"]["tool"]) == ("peft-ds train", "peft-ds consolidate")
    assert trained["source"]["checkpoint"] == consolidated["source"]["checkpoint"] == str(out / "checkpoints/step3")
    assert trained["source"]["model_dtype"] == consolidated["source"]["model_dtype"] == "fp32"  # the run's dtype
    summary = json.loads((out / "eval_gsm8k.json").read_text())
    assert {k: summary[k] for k in ("base", "adapter", "data_dir", "limit", "num_beams", "batch_size", "extractor")} == {
        "base": "tiny-llama", "adapter": str(out / "adapter"), "data_dir": os.path.join(ROOT, "peft_ds", "assets", "eval"),
        "limit": 4, "num_beams": 1, "batch_size": 1, "extractor": "faithful"}
    assert summary["accuracy"]["gsm8k"]["max_new_tokens"] == 256 and summary["accuracy"]["gsm8k"]["examples"] == 4
