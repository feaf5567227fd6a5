"""train.report_to on real 2-rank ZeRO-3 runs: TensorBoard event files beside metrics.jsonl, read back
with TensorBoard's own reader, hold the same numbers; a resumed run does not repeat steps there; the
gradient norm is logged and the same on 2 ranks as on 1; unknown or unusable exporters are refused."""

import importlib.util
import json
import os
import shutil

import pytest
import yaml
from launch import peft_ds, write_config
from test_train_inputs import refused

from peft_ds.checkpoint import LATEST
from peft_ds.reporting import TENSORBOARD_DIR

METHOD = {"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2, "sibo_learnable": True}
STEPS = 4


def run_config(tmp_path, name, **train):
    """4 steps of LoRA with learnable SIBO, validation every 2 steps, checkpoints at steps 2 and 4."""
    path = write_config(tmp_path / f"{name}.yaml", tmp_path / name, method=METHOD, max_steps=STEPS, save_every=2,
                        eval_every=2, **train)
    with open(path) as f:
        config = yaml.safe_load(f)
    config["data"]["val_set_size"] = 8
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def rows(output_dir):
    with open(os.path.join(str(output_dir), "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "loss" in row or "val_loss" in row]


def events(output_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(str(output_dir), TENSORBOARD_DIR))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected_events(output_dir):
    """metrics.jsonl as scalars: a number per tag and step, a list one tag per entry."""
    expected = {}
    for row in rows(output_dir):
        for key, value in row.items():
            values = value if isinstance(value, list) else [value]
            tags = [f"{key}/{i}" for i in range(len(values))] if isinstance(value, list) else [key]
            if key != "step":
                for tag, v in zip(tags, values):
                    expected.setdefault(tag, []).append((row["step"], v))
    return expected


def assert_events_match_metrics(output_dir):
    logged, expected = events(output_dir), expected_events(output_dir)
    assert logged.keys() == expected.keys()
    for tag in expected:  # float32 in the event files
        assert [s for s, _ in logged[tag]] == [s for s, _ in expected[tag]], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-6, abs=1e-12), tag


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run on 2 ranks (`peft-ds train --nproc 2`) and on 1."""
    root = tmp_path_factory.mktemp("reporting")
    for world in (2, 1):
        r = peft_ds("train", run_config(root, f"w{world}"), "--nproc", str(world))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return root


@pytest.mark.slow
def test_event_files_hold_what_metrics_jsonl_holds(runs):
    logged = events(runs / "w2")
    for tag in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_s", "sibo_lambda/0", "sibo_lambda/1"):
        assert tag in logged, sorted(logged)
    assert [s for s, _ in logged["loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in logged["val_loss"]] == [2, 4]
    assert_events_match_metrics(runs / "w2")


@pytest.mark.slow
def test_gradient_norm_is_logged_and_the_same_on_two_ranks_as_on_one(runs):
    one, two = ({r["step"]: r["grad_norm"] for r in rows(runs / w) if "loss" in r} for w in ("w1", "w2"))
    assert one.keys() == two.keys() == set(range(1, STEPS + 1))
    assert all(two[s] == pytest.approx(one[s], rel=1e-5) for s in one), (one, two)
    assert all(norm > 0 for norm in one.values()) and len(set(one.values())) == STEPS


@pytest.mark.slow
def test_resume_does_not_repeat_steps_in_tensorboard(runs, tmp_path):
    """As if killed after step 4's rows were logged but before its checkpoint: resume from step 2 rewrites
    steps 3 and 4 into a second event file, and TensorBoard shows each step once (on 1 rank: cheaper)."""
    run = tmp_path / "w1"
    shutil.copytree(runs / "w1", run)
    shutil.rmtree(run / "checkpoints" / f"step{STEPS}")
    (run / "checkpoints" / LATEST).write_text("step2")
    with open(runs / "w1.yaml") as f:
        config = yaml.safe_load(f)
    config["output_dir"] = str(run)
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    r = peft_ds("train", str(tmp_path / "resume.yaml"), "--nproc", "1", "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(os.listdir(run / TENSORBOARD_DIR)) == 2  # the first start's event file is still there
    assert [r["step"] for r in rows(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert_events_match_metrics(run)
    first = [r["loss"] for r in rows(runs / "w1") if "loss" in r]
    assert [r["loss"] for r in rows(run) if "loss" in r] == pytest.approx(first, rel=1e-6)


def test_unknown_exporter_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    refused(capsys, ["train", cfg, "--nproc", "2", "--set", "train.report_to=[jsonl, tensorbord]"],
            "train.report_to: unknown 'tensorbord' (known: jsonl, tensorboard, wandb)", tmp_path)


def test_wandb_without_install_or_login_is_refused_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out", report_to=["jsonl", "wandb"])
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    message = ("wandb, which is not installed" if importlib.util.find_spec("wandb") is None
               else "W&B has no login here")
    refused(capsys, ["train", cfg, "--nproc", "2"], message, tmp_path)
