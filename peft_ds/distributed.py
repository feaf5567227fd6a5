"""Process-group set-up for training: ranks from the launcher's environment (torchrun, the deepspeed
launcher, or the `launcher/` entry for Slurm and MPI), or a single process when there is none."""

from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed through DeepSpeed once per process."""
    import deepspeed

    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# Set by srun (for a step of several tasks) and by mpirun: then every process is one of several ranks.
TASK_COUNT_VARIABLES = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def world_size_from_env() -> int:
    """WORLD_SIZE, or 1 for a lone process. A process started as one of several srun / mpirun tasks
    without RANK and WORLD_SIZE is refused: it would train alone, beside its siblings, into the same
    output directory."""
    if "WORLD_SIZE" not in os.environ:
        for name in TASK_COUNT_VARIABLES:
            if int(os.environ.get(name, "1") or 1) > 1:
                from .errors import PeftDsError

                raise PeftDsError(
                    f"started as one of {os.environ[name]} tasks ({name}) without RANK/WORLD_SIZE: start the ranks "
                    f"with torchrun, the deepspeed launcher or --nproc (srun and mpirun rank discovery: launcher/)"
                )
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def same_on_all_ranks(value: int) -> bool:
    t = torch.tensor([value, -value], dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def run_local(nproc: int, argv: list[str], preempted_code: int) -> int:
    """Start `python -m peft_ds ARGV` as `nproc` local ranks (torchrun's environment), forward
    SIGTERM/SIGUSR1/SIGINT to them, and stop them all as soon as one fails, so that a dead rank never
    leaves the others hanging in a collective. Returns 0, `preempted_code`, or the failing code."""
    import signal
    import subprocess
    import sys
    import time

    port = str(_free_port())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": threads}
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        procs.append(subprocess.Popen([sys.executable, "-m", "peft_ds", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0, preempted_code)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.time() + 10
                for p in procs:
                    try:
                        p.wait(timeout=max(0.1, deadline - time.time()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                return failed[0] if failed[0] > 0 else 1
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if preempted_code in codes:
        return preempted_code
    return next((c for c in codes if c != 0), 0)
