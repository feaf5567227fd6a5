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
from test_train_inputs import refused
from test_train_schedule import trainer_learning_rates

from peft_ds.checkpoint import META
from peft_ds.local_launcher import HANDOFF_PREFIX

pytestmark = pytest.mark.slow

STEPS = 10
METHOD = {"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2, "sibo_learnable": True}


def config(tmp_path, name):
    return write_config(tmp_path / f"{name}.yaml", tmp_path / name, model="tiny-gptj", method=METHOD,
                        max_steps=STEPS, save_every=2, lr=1.0e-2, warmup_steps=2)


def start(cfg, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "peft_ds", "train", cfg, "--nproc", "2"], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


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
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = start(cfg, env={**os.environ, "TMPDIR": str(scratch)})
    wait_for_step(tmp_path / "killed", 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # parent and both ranks, mid-run
    proc.wait()
    # the inputs handed to the ranks (train.save_prepared) went once they had read them
    assert not [p for p in scratch.iterdir() if p.name.startswith(HANDOFF_PREFIX)]
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


def test_ranks_die_with_their_launcher(tmp_path):
    """SIGKILL of `peft-ds train --nproc 2` (nothing can forward it) ends both ranks within seconds:
    none trains on with parent 1, writing into output_dir."""
    import psutil

    cfg = write_config(tmp_path / "orphan.yaml", tmp_path / "orphan", model="tiny-gptj", method=METHOD,
                       max_steps=10_000, save_every=0)
    proc = start(cfg)
    wait_for_step(tmp_path / "orphan", 1, proc)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only, not its process group
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, [p.pid for p in alive]
    size = os.path.getsize(tmp_path / "orphan" / "metrics.jsonl")
    time.sleep(2)
    assert os.path.getsize(tmp_path / "orphan" / "metrics.jsonl") == size


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


# ---- issue 14: a failed resume changes nothing; a kill at the worst moment loses one checkpoint at most ----


def copy_of(reference, tmp_path, name="copy"):
    shutil.copytree(reference, tmp_path / name)
    return config(tmp_path, name), tmp_path / name


@pytest.mark.parametrize("nproc,override,message", [
    (2, ["method.r=8"], "holds other adapter parameters than the config asks for (method.r: 4 in the checkpoint, "
                        "8 in the config)"),
    (2, ["method.sibo_learnable=false"], "(method.sibo_learnable: True in the checkpoint, False in the config)"),
    (2, ["method.target_modules=[q_proj,fc_in]"], "method.target_modules: ['q_proj', 'k_proj', 'v_proj', 'fc_in', "
                                                  "'fc_out'] in the checkpoint, ['q_proj', 'fc_in'] in the config"),
    (2, ["method.method=adapter"], "was trained with method lora, the config asks for adapter"),
    (2, ["model.name_or_path=tiny-llama"], "was trained on a base with {'model_type': 'gptj', 'hidden_size': 128"),
    (1, [], "was written by 2 ranks, this run has 1: ZeRO partitions cannot be resumed on another world size"),
    (2, [f"deepspeed={ROOT}/ds_configs/no_zero_cpu.json"], "was written under ZeRO stage 3, the DeepSpeed config "
                                                           "has stage 0"),
], ids=["r", "sibo_learnable", "targets", "method", "base", "world_size", "zero_stage"])
def test_failed_resume_rewrites_nothing(reference, tmp_path, capsys, nproc, override, message):
    """Refused before any rank starts: config.yaml still describes the checkpoints (it was rewritten)."""
    cfg, run = copy_of(reference, tmp_path)
    argv = ["train", cfg, "--nproc", str(nproc), "--resume", *[x for o in override for x in ("--set", o)]]
    line = refused(capsys, argv, message, run)
    assert str(run / "checkpoints" / f"step{STEPS}") in line


def test_truncated_checkpoint_file_is_named(reference, tmp_path, capsys):
    cfg, run = copy_of(reference, tmp_path)
    tag_dir = run / "checkpoints" / f"step{STEPS}"
    victim = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    argv = ["train", cfg, "--nproc", "2", "--resume"]
    refused(capsys, argv, f"checkpoint {tag_dir} is damaged: {victim.name} has {size // 2} bytes, {META} records "
            f"{size}", run)
    # a checkpoint written before sizes were recorded: the archive's missing end names the file
    with open(tag_dir / META) as f:
        meta = json.load(f)
    del meta["file_sizes"]
    with open(tag_dir / META, "w") as f:
        json.dump(meta, f)
    refused(capsys, argv, f"checkpoint {tag_dir} is damaged: {victim.name} is not a complete torch file", run)


@pytest.mark.parametrize("moment", ["rank_files_cut", "meta_written_latest_not_moved", "metrics_line_cut"])
def test_kill_at_the_worst_moment_resumes_the_previous_checkpoint(reference, tmp_path, moment):
    """The writer killed, simulated deterministically: while DeepSpeed wrote step 10 (no meta file, a
    rank file cut), between the meta file and moving `latest` (latest.tmp written), or mid-way through
    a metrics line (step 10 never saved). --resume picks step 8 and ends as the uninterrupted run."""
    cfg, run = copy_of(reference, tmp_path, "killed")
    ckpts, last = run / "checkpoints", run / "checkpoints" / f"step{STEPS}"
    shutil.rmtree(run / "adapter")
    os.remove(run / "loss.png")
    (ckpts / "latest").write_text(f"step{STEPS - 2}")
    if moment == "rank_files_cut":
        os.remove(last / META)
        with open(last / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
            f.truncate(1000)
    elif moment == "meta_written_latest_not_moved":
        (ckpts / "latest.tmp").write_text(f"step{STEPS}")
    else:
        shutil.rmtree(last)
        rows = [row for row in (run / "metrics.jsonl").read_text().splitlines(keepends=True)
                if json.loads(row)["step"] < STEPS]
        (run / "metrics.jsonl").write_text("".join(rows[:-1]) + rows[-1][:len(rows[-1]) // 2])
    r = peft_ds("train", cfg, "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpts} at step {STEPS - 2}" in r.stdout
    assert_same_run(run, reference)
