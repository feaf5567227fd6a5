"""Checkpoints and resume on real 2-rank ZeRO-3 runs: kill -9 and resume, SIGUSR1 save-and-exit and
resume, both ending exactly where an uninterrupted run ends; incomplete checkpoints are refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from launch import ROOT, adapter, losses, peft_ds, write_config
from test_train_schedule import trainer_learning_rates

pytestmark = pytest.mark.slow

STEPS = 10
METHOD = {"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2, "sibo_learnable": True}


def config(tmp_path, name):
    return write_config(tmp_path / f"{name}.yaml", tmp_path / name, model="tiny-gptj", method=METHOD,
                        max_steps=STEPS, save_every=2, lr=1.0e-2, warmup_steps=2)


def start(cfg):
    return subprocess.Popen([sys.executable, "-m", "peft_ds", "train", cfg, "--nproc", "2"], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(out_dir, step, proc, timeout=300):
    path = os.path.join(str(out_dir), "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {path}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    r = peft_ds("train", config(tmp, "ref"), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "ref"


def assert_same_run(resumed, reference):
    a, b = adapter(resumed), adapter(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-8), key
    la, lb = losses(resumed), losses(reference)
    assert la.keys() == lb.keys() == set(range(1, STEPS + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-6), step
    assert learning_rates(resumed) == learning_rates(reference)


def learning_rates(output_dir):
    with open(os.path.join(str(output_dir), "metrics.jsonl")) as f:
        return {row["step"]: row["lr"] for row in map(json.loads, f) if "lr" in row}


def test_logged_lr_is_the_trainers(reference, tmp_path):
    """A real 2-rank run logs, at every step, the lr a transformers Trainer logs for the same settings."""
    ours = learning_rates(reference)
    expected = trainer_learning_rates("linear", steps=STEPS, warmup=2, lr=1.0e-2, tmp_dir=tmp_path)
    assert ours.keys() == expected.keys() == set(range(1, STEPS + 1))
    assert all(ours[s] == pytest.approx(expected[s], rel=1e-12, abs=1e-15) for s in ours), (ours, expected)


def test_kill_and_resume_matches_uninterrupted(reference, tmp_path):
    cfg = config(tmp_path, "killed")
    proc = start(cfg)
    wait_for_step(tmp_path / "killed", 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # parent and both ranks, mid-run
    proc.wait()
    with open(tmp_path / "killed" / "checkpoints" / "latest") as f:
        tag = f.read()
    assert tag in {f"step{s}" for s in (4, 6)}
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_run(tmp_path / "killed", reference)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_saves_exits_75_and_resumes(reference, tmp_path, signum):
    cfg = config(tmp_path, "signalled")
    proc = start(cfg)
    wait_for_step(tmp_path / "signalled", 3, proc)
    os.kill(proc.pid, signum)  # SIGUSR1: what Slurm's --signal=USR1@T delivers; SIGTERM: preemption
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-2000:]
    assert "stopped on a signal after saving a checkpoint" in out
    with open(tmp_path / "signalled" / "checkpoints" / "latest") as f:
        step = int(f.read().removeprefix("step"))
    assert 3 <= step < STEPS
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "signalled", reference)


def test_incomplete_checkpoints_are_refused(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    cfg = write_config(tmp_path / "copy.yaml", run, model="tiny-gptj", method=METHOD, max_steps=STEPS, save_every=2)
    os.remove(run / "checkpoints" / "latest")
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 2 and "there is no 'latest' file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with open(run / "checkpoints" / "latest", "w") as f:
        f.write(f"step{STEPS}")
    os.remove(run / "checkpoints" / f"step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 2
    assert "incomplete: missing rank file zero_pp_rank_1_mp_rank_00_optim_states.pt" in r.stderr
    # a run without --resume refuses to overwrite the existing results
    before = sorted(os.listdir(run))
    r = peft_ds("train", cfg, "--nproc", "2")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert sorted(os.listdir(run)) == before
    # a different world size cannot resume ZeRO partitions
    os.remove(run / "checkpoints" / "latest")
    with open(run / "checkpoints" / "latest", "w") as f:
        f.write(f"step{STEPS - 2}")
    r = peft_ds("train", cfg, "--nproc", "1", "--resume")
    assert r.returncode != 0 and "cannot be resumed on another world size" in (r.stderr + r.stdout)


def test_adamix_resume_continues_the_route_sequence(tmp_path):
    cfg = write_config(tmp_path / "adamix.yaml", tmp_path / "adamix", model="tiny-llama",
                       method={"method": "adamix_lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2}, max_steps=6,
                       save_every=3, lr=1.0e-2)
    r = peft_ds("train", cfg, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "adamix"
    with open(out / "metrics.jsonl") as f:
        routes = [row["route_digest"] for row in map(json.loads, f) if "route_digest" in row]
    final = adapter(out)
    # back to the step-3 checkpoint, as if the job had stopped there
    shutil.rmtree(out / "checkpoints" / "step6")
    shutil.rmtree(out / "adapter")
    with open(out / "checkpoints" / "latest", "w") as f:
        f.write("step3")
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        resumed = [row["route_digest"] for row in map(json.loads, f) if "route_digest" in row]
    assert resumed == routes and len(set(routes)) == 6
    again = adapter(out)
    assert all(torch.allclose(again[k], final[k], rtol=1e-6, atol=1e-8) for k in final)
