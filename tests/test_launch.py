"""Multi-node launch on a real Slurm cluster of two "nodes" started here (tests/slurm_cluster.py):
the real slurm/ scripts under `sbatch`, preemption and requeue in every launch mode (srun, torchrun
--nnodes 2, the deepspeed launcher's slurm backend, mpirun), a killed rank, misuse; and the same run
through the deepspeed launcher with a two-entry hostfile and mpirun -n 2 outside Slurm, each giving the
same adapter. Rank discovery unit tests; shellcheck."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from launch import MATH, ROOT, adapter
from slurm_cluster import SlurmCluster, available

from peft_ds import distributed
from peft_ds.errors import PeftDsError

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
STEPS = 6
# The flagship's run config, made tiny: tiny-llama, CPU ZeRO-3 in fp32, micro-batch 2 x accumulation 4
# x 2 ranks = its global batch 16.
TINY = (f"--set train.max_steps={STEPS} --set train.micro_batch_size=2 --set train.save_every=2 "
        "--set train.warmup_steps=2 --set train.lr=1e-2 --set data.cutoff_len=64 --set data.val_set_size=0 "
        "--set model.dtype=fp32")


def job_env(cluster_env, output_dir, model="tiny-llama", **extra):
    return {**cluster_env, "PATH": f"{BIN}:{cluster_env['PATH']}", "PYTHON": sys.executable, "MODEL_PATH": model,
            "DATA_PATH": MATH, "OUTPUT_DIR": str(output_dir), "DS_CONFIG": "ds_configs/zero3_cpu.json",
            "GPUS_PER_NODE": "1", "EXTRA_ARGS": TINY, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


SBATCH_TINY = ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not available():
        pytest.fail("Slurm (slurmctld, slurmd, sbatch) is not installed: .ci/run installs it (scripts/install_system.sh)")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def sbatch_wait(cluster, script, env, log, *options, timeout=900):
    r = subprocess.run(["sbatch", "--wait", *SBATCH_TINY, *options, f"--output={log}", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    text = open(log).read() if os.path.exists(log) else ""
    return r.returncode, text + r.stderr


def submit(cluster, script, env, log, *options):
    r = subprocess.run(["sbatch", "--parsable", *SBATCH_TINY, *options, f"--output={log}", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_for_step(output_dir, step, timeout=600):
    path = os.path.join(str(output_dir), "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and sum('"loss"' in line for line in open(path)) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {path}")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_for_end(cluster, job_id, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = cluster.job_state(job_id)
        if state in ENDED:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {cluster.job_state(job_id)} after {timeout} s")


def start_requeued_now(cluster, job_id, timeout=600):
    """Slurm holds a requeued job for about 2 minutes (Reason=BeginTime): start it a few seconds after it
    is held. Not at once: slurmd revoked the job's credential when it killed the first run, and a new
    credential issued within the same second is refused ("Job credential revoked", the job fails)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
        fields = r.stdout.split()
        if "JobState=PENDING" in fields and "Restarts=0" not in fields:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], env=cluster.env,
                           capture_output=True)
            return
        if any(f"JobState={state}" in fields for state in ENDED):
            return  # ended without a requeue: the caller's checks say what went wrong
        time.sleep(0.5)


@pytest.fixture(scope="module")
def flagship(cluster, tmp_path_factory):
    """slurm/llama13b_lora_sibo.sh on 2 nodes x 1 task (srun, the default launch mode)."""
    tmp = tmp_path_factory.mktemp("flagship")
    code, log = sbatch_wait(cluster, "slurm/llama13b_lora_sibo.sh", job_env(cluster.env, tmp / "run"),
                            str(tmp / "job.out"))
    assert code == 0, log[-5000:]
    return tmp / "run", log


def test_flagship_script_on_two_nodes(flagship):
    run, log = flagship
    assert "world size 2 over 2 nodes" in log and "via slurm" in log, log[-3000:]
    assert "launch.sh: srun, 2 node(s) x 1 = 2 ranks" in log
    # the plan in the job log before the ranks start; no nvidia-smi, no PEFT_DS_GPU_MEMORY: no verdict
    assert "GPU memory unknown" in log and "peft-ds plan: tiny-llama (4 layers), lora + SIBO, fp32" in log
    assert log.index("peft-ds plan:") < log.index("launch.sh: srun")
    consolidated = run / "consolidated"
    assert (consolidated / "adapter.safetensors").is_file() and (consolidated / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    final = load_file(str(consolidated / "adapter.safetensors"))
    assert final.keys() == adapter(run).keys() and all(torch.equal(final[k], adapter(run)[k]) for k in final)


def test_another_script_gptj_adapter_sibo(cluster, tmp_path):
    # a GPU too small for the plan, whose check PEFT_DS_SKIP_PLAN=1 skips (the misuse test sees it refused)
    env = job_env(cluster.env, tmp_path / "run", "tiny-gptj", PEFT_DS_GPU_MEMORY="0.01", PEFT_DS_SKIP_PLAN="1")
    code, log = sbatch_wait(cluster, "slurm/gptj_adapter_sibo.sh", env, str(tmp_path / "job.out"))
    assert code == 0, log[-5000:]
    assert "world size 2 over 2 nodes" in log and "peft-ds plan" not in log
    assert (tmp_path / "run" / "consolidated" / "adapter.safetensors").is_file()


# ---- the same run through every launch path ------------------------------------------------------------


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8, msg=key)


def launch_outside_slurm(mode, tmp_path, **extra):
    """launcher/launch.sh with the flagship's run config, on this machine (no Slurm allocation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{BIN}:{env['PATH']}", "PYTHON": sys.executable, "LAUNCH_MODE": mode, "GPUS_PER_NODE": "1",
                "NNODES": "2", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "MASTER_PORT": str(distributed.free_port()), **extra})
    args = ["configs/llama13b_lora_sibo.yaml", "--set", "model.name_or_path=tiny-llama", "--set",
            f"data.train_file={MATH}", "--set", f"output_dir={tmp_path / 'run'}", "--set",
            "deepspeed=ds_configs/zero3_cpu.json", *TINY.split()]
    r = subprocess.run(["bash", "launcher/launch.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


def test_deepspeed_launcher_with_hostfile_equals_srun(flagship, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two entries: two "nodes"
    out = launch_outside_slurm("deepspeed", tmp_path, HOSTFILE=str(hostfile), DS_LAUNCHER="mpich",
                               DEEPSPEED_ARGS="--no_ssh_check")
    assert "world size 2" in out and "-hosts localhost,127.0.0.1" in out
    assert_same_weights(adapter(tmp_path / "run"), adapter(flagship[0]))


def test_mpirun_with_mpi4py_discovery_equals_srun(flagship, tmp_path):
    out = launch_outside_slurm("mpi", tmp_path, NNODES="1", GPUS_PER_NODE="2")
    assert "world size 2 over 1 node" in out and "via mpi" in out
    assert_same_weights(adapter(tmp_path / "run"), adapter(flagship[0]))


# ---- preemption, failure, misuse -------------------------------------------------------------------------


def own_run_config(path, train_file):
    """The flagship's run config with its own data.train_file, as a job's RUN_CONFIG."""
    with open(os.path.join(ROOT, "configs", "llama13b_lora_sibo.yaml")) as f:
        config = yaml.safe_load(f)
    config["data"]["train_file"] = train_file
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.mark.parametrize("mode", ["srun", "torchrun", "deepspeed", "mpi"])
def test_signal_saves_requeues_and_resumes_to_the_same_weights(cluster, flagship, tmp_path, mode):
    """Each launch mode under Slurm, signalled mid-run: the weights of the uninterrupted srun job (so this is
    also the test that torchrun --nnodes 2, the deepspeed launcher's slurm backend and mpirun under Slurm
    train the same adapter as srun)."""
    env = job_env(cluster.env, tmp_path / "run", LAUNCH_MODE=mode)
    if mode == "deepspeed":  # also a job with its own run config and DATA_PATH unset: it trains on the config's data
        del env["DATA_PATH"]
        env["RUN_CONFIG"] = own_run_config(tmp_path / "run.yaml", MATH)
    log = str(tmp_path / "job.out")
    job = submit(cluster, "slurm/llama13b_lora_sibo.sh", env, log)
    wait_for_step(tmp_path / "run", 2)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)  # what --signal=USR1@300 sends
    start_requeued_now(cluster, job)
    assert wait_for_end(cluster, job, timeout=900) == "COMPLETED", open(log).read()[-5000:]
    text = open(log).read()
    assert f"launch.sh: {mode}, 2 node(s)" in text and "world size 2 over 2 nodes" in text, text[-5000:]
    if mode == "deepspeed":
        assert "cmd = srun" in text, text[-5000:]  # the launcher's slurm backend, the default under Slurm
    assert "requeueing job" in text and "restart 1" in text and "resumed from" in text, text[-5000:]
    assert_same_weights(adapter(tmp_path / "run"), adapter(flagship[0]))
    assert (tmp_path / "run" / "consolidated" / "adapter.safetensors").is_file()


def test_killed_rank_fails_the_job(cluster, tmp_path):
    run = tmp_path / "killed_run"
    env = job_env(cluster.env, run, EXTRA_ARGS=TINY.replace(f"max_steps={STEPS}", "max_steps=500"))
    log = str(tmp_path / "job.out")
    job = submit(cluster, "slurm/llama13b_lora_sibo.sh", env, log)
    wait_for_step(run, 1)
    pids = subprocess.run(["pgrep", "-f", f"^{sys.executable} -m peft_ds train .*output_dir={run}"],
                          capture_output=True, text=True).stdout.split()  # the ranks, not srun
    assert len(pids) == 2, pids
    killed = time.time()
    os.kill(int(pids[1]), signal.SIGKILL)
    state = wait_for_end(cluster, job, timeout=180)
    assert state == "FAILED", (state, open(log).read()[-3000:])
    assert time.time() - killed < 180
    assert not subprocess.run(["pgrep", "-f", f"output_dir={run}"], capture_output=True).stdout


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_cancelled_job_leaves_no_rank_behind(cluster, tmp_path, mode):
    """scancel mid-run: every process of the job (launcher, torchrun, ranks) is gone within a minute,
    also under proctrack/linuxproc, which loses a rank whose parent died (the rank watches its parent)."""
    run = tmp_path / "cancelled_run"
    env = job_env(cluster.env, run, LAUNCH_MODE=mode, EXTRA_ARGS=TINY.replace(f"max_steps={STEPS}", "max_steps=500"))
    job = submit(cluster, "slurm/llama13b_lora_sibo.sh", env, str(tmp_path / "job.out"))
    wait_for_step(run, 1)
    subprocess.run(["scancel", job], env=cluster.env, check=True)
    assert wait_for_end(cluster, job, timeout=180) == "CANCELLED"
    deadline = time.time() + 90
    while subprocess.run(["pgrep", "-f", f"output_dir={run}"], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-af", f"output_dir={run}"], capture_output=True, text=True).stdout
    assert not left, left


@pytest.mark.parametrize("change,message", [
    ({"LAUNCH_MODE": "slurmrun"}, "unknown LAUNCH_MODE 'slurmrun'"),
    ({"MODEL_PATH": ""}, "MODEL_PATH=/path/to/llama-13b-hf does not exist"),  # unset: the script's placeholder
    ({"MODEL_PATH": "/nonexistent/llama-13b-hf"}, "MODEL_PATH=/nonexistent/llama-13b-hf does not exist"),
    ({"GPUS_PER_NODE": "3"}, "GPUS_PER_NODE=3"),
    ({"PEFT_DS_GPU_MEMORY": "0.01"}, "does not fit: "),  # the plan's verdict against 10 MiB GPUs
    ({"LAUNCH_MODE": "deepspeed", "DS_LAUNCHER": "mpich"},  # the script has --requeue
     "LAUNCH_MODE=deepspeed with DS_LAUNCHER=mpich cannot save and requeue on the preemption signal"),
])
def test_misuse_fails_early_with_a_clear_message(cluster, tmp_path, change, message):
    started = time.time()
    code, log = sbatch_wait(cluster, "slurm/llama13b_lora_sibo.sh", {**job_env(cluster.env, tmp_path / "run"), **change},
                            str(tmp_path / "job.out"))
    assert code == 2, log[-3000:]
    assert message in log, log[-3000:]
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert time.time() - started < 120


def test_data_path_unset_means_the_run_configs_data(cluster, tmp_path):
    config = own_run_config(tmp_path / "run.yaml", "/nonexistent/own.json")
    env = job_env(cluster.env, tmp_path / "run", RUN_CONFIG=config)
    del env["DATA_PATH"]  # unset: the run config's train_file, which the job's check then finds missing
    code, log = sbatch_wait(cluster, "slurm/llama13b_lora_sibo.sh", env, str(tmp_path / "job.out"))
    assert code == 2, log[-3000:]
    assert "data file /nonexistent/own.json does not exist" in log and "math_10k" not in log, log[-3000:]


# ---- pieces --------------------------------------------------------------------------------------------


def test_hostfile_from_the_allocation(cluster, tmp_path):
    env = {**cluster.env, "SLURM_JOB_NODELIST": "node[01-03]", "GPUS_PER_NODE": "8"}
    subprocess.run(["bash", "launcher/hostfile.sh", str(tmp_path / "hostfile")], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "hostfile").read_text() == "node01 slots=8\nnode02 slots=8\nnode03 slots=8\n"


def test_discover_from_each_source(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster.conf)
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert distributed.discover(torchrun) == (torchrun, "launcher variables")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_JOB_ID": "77",
             "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    variables, source = distributed.discover(slurm)
    assert source == "slurm" and variables == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "16",
                                               "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 77)}
    assert distributed.discover({})[1] == "single process"
    with pytest.raises(PeftDsError, match="SLURM_PROCID"):
        distributed.discover({"SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"})


def test_shellcheck_passes():
    scripts = sorted(f"{d}/{f}" for d in ("slurm", "launcher") for f in os.listdir(os.path.join(ROOT, d))
                     if f.endswith(".sh"))
    assert len(scripts) >= 10
    assert shutil.which("shellcheck"), "shellcheck is not installed (.ci/run installs it)"
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_every_script_documents_its_settings():
    for name in os.listdir(os.path.join(ROOT, "slurm")):
        if not name.endswith(".sh"):
            continue
        text = open(os.path.join(ROOT, "slurm", name)).read()
        headers = re.findall(r"^#SBATCH (--[a-z-]+)", text, re.M)
        for option in ("--nodes", "--ntasks-per-node", "--gres", "--cpus-per-task", "--time", "--signal", "--requeue"):
            assert option in headers, (name, option)
        assert "$" not in "".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
        for variable in ("MODEL_PATH", "DATA_PATH", "OUTPUT_DIR", "RUN_CONFIG", "DS_CONFIG", "GPUS_PER_NODE",
                         "LAUNCH_MODE", "EXTRA_ARGS"):
            assert f"#   {variable}" in text, (name, variable)
        # DATA_PATH has no default of its own: unset, the run config's train_file is used
        assert re.search(r"^#   DATA_PATH .*: unset, the run config's data.train_file$", text, re.M), name
        assert not re.search(r"^\s*(export )?DATA_PATH=", text, re.M), name
        assert os.path.isfile(os.path.join(ROOT, "configs", name.replace(".sh", ".yaml")))
