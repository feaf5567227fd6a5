"""Process-group set-up for training: every rank finds its rank, local rank, world size and master
from whichever launcher started it (torchrun, the deepspeed launcher, srun, mpirun; `discover`), or
runs alone when there is none. `launcher/launch.sh` starts the ranks on a cluster; `run_local`
(`--nproc`) on one machine."""

from __future__ import annotations

import os
import socket
import sys

import torch

from .errors import PeftDsError


def op_cache_per_environment(env=os.environ) -> str | None:
    """Where DeepSpeed's JIT-compiled CPU ops (the shm collective op) are kept: TORCH_EXTENSIONS_DIR,
    which torch defaults to ~/.cache/torch_extensions, shared by every environment of the user, so two
    environments with different torch or DeepSpeed builds rebuild the op in turn (45-180 s each on 2
    cores). Unless the user chose a place, keep it inside this environment (sys.prefix, a venv), so
    it is compiled once per environment. Set at import of peft_ds; ranks inherit it."""
    if "TORCH_EXTENSIONS_DIR" not in env and os.access(sys.prefix, os.W_OK):
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return env.get("TORCH_EXTENSIONS_DIR")


STALE_LOCK_SECONDS = 600  # a build's lock, and every file of its build directory, untouched this long


def _open_on_this_host(path: str) -> bool:
    """Whether a process of this host has `path` open (its /proc/<pid>/fd links), as the builder holds its lock."""
    target = os.path.realpath(path)
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            links = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except OSError:  # gone, or not ours to read
            continue
        if target in links:
            return True
    return False


def clear_stale_op_locks(env=os.environ, now: float | None = None) -> list[str]:
    """Remove the build locks that a killed DeepSpeed op build left in TORCH_EXTENSIONS_DIR; returns them.
    torch's JIT build takes `<dir>/<op>/lock` (a file it holds open) for every load of the op, built or not,
    and a process that finds the lock waits for it to go: after an OOM kill mid-build every later run in
    the environment hung there. A lock is stale when no process of this host holds it open and neither it
    nor any file of its build directory changed for STALE_LOCK_SECONDS (a builder on another node sharing
    the directory keeps writing its object files). Called by the checks that run before any rank."""
    import glob
    import time

    root = env.get("TORCH_EXTENSIONS_DIR")
    if not root or not os.path.isdir(root):
        return []
    now = time.time() if now is None else now
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        build_dir = os.path.dirname(lock)
        try:
            newest = max(os.path.getmtime(os.path.join(build_dir, name)) for name in os.listdir(build_dir))
        except (OSError, ValueError):
            continue
        if now - newest < STALE_LOCK_SECONDS or _open_on_this_host(lock):
            continue
        try:
            os.remove(lock)
        except FileNotFoundError:  # another rank's check took it
            continue
        removed.append(lock)
        print(f"peft-ds: removed the stale lock {lock} of a DeepSpeed op build that was killed "
              f"{(now - newest) / 60:.0f} min ago (every run would have waited on it)", file=sys.stderr, flush=True)
    return removed


def cpu_accelerator_without_cuda(env=os.environ) -> None:
    """Without CUDA, name DeepSpeed's CPU accelerator before DeepSpeed is imported: DeepSpeed would
    otherwise warn on every command that it "was unable to detect" a GPU, also on those that use no
    distributed backend (preset, check, consolidate). A user's DS_ACCELERATOR wins."""
    import torch

    if "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"


PORT_FLOOR = 15000  # rendezvous ports are drawn from here up to the kernel's ephemeral range


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections and bind(0) (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free now for a rendezvous store to listen on, drawn below the ephemeral range. A port
    that bind(0) hands out lies in that range, where every outgoing connection also takes its port (the
    gloo pairs between ranks open many), so another job on the machine can take it before the store
    listens (EADDRINUSE); below the range only another listener can."""
    import random

    top = _ephemeral_floor()
    for port in random.SystemRandom().sample(range(PORT_FLOOR, top), min(64, max(0, top - PORT_FLOOR))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set by mpirun / mpiexec (Open MPI; MPICH's hydra and srun --mpi=pmi2) in every rank it starts.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_discovered: tuple[dict, str] | None = None
_had_process_group = False  # see exit_process


def _count(env, name) -> int:
    try:
        return int(env.get(name) or 1)
    except ValueError:
        return 1


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`node[01-03]` style), as `scontrol show hostnames` expands it."""
    import subprocess

    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PeftDsError(f"cannot expand the Slurm node list {nodelist!r} with scontrol: {err}") from None
    hosts = r.stdout.split()
    if r.returncode != 0 or not hosts:
        raise PeftDsError(f"scontrol show hostnames {nodelist!r} failed: {r.stderr.strip() or 'no hosts'}")
    return hosts[0]


def _from_slurm(env) -> dict:
    missing = [n for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID") if n not in env]
    if missing:
        raise PeftDsError(f"srun task without {missing[0]}: cannot tell this rank")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    addr = env.get("MASTER_ADDR") or _first_host(nodelist)
    # One port per job, the same in every task, away from the well-known range
    port = env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "MASTER_ADDR": addr, "MASTER_PORT": port}


def _from_mpi(env, size_variable) -> dict:
    try:
        from mpi4py import MPI
    except ImportError:
        raise PeftDsError(f"started by MPI ({size_variable}={env[size_variable]}) but mpi4py is not installed: "
                          f"pip install 'peft-ds[mpi]'") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != _count(env, size_variable):
        raise PeftDsError(f"the launcher started {env[size_variable]} MPI ranks ({size_variable}) but mpi4py sees "
                          f"{comm.Get_size()}: mpi4py is built for another MPI than the mpirun used")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    # rank 0's host and a port free there, the same in every rank
    addr, port = comm.bcast((env.get("MASTER_ADDR") or socket.gethostname(),
                             env.get("MASTER_PORT") or str(free_port())) if comm.Get_rank() == 0 else None, root=0)
    variables = {"RANK": str(comm.Get_rank()), "LOCAL_RANK": str(local.Get_rank()),
                 "WORLD_SIZE": str(comm.Get_size()), "MASTER_ADDR": addr, "MASTER_PORT": port}
    local.Free()
    return variables


def discover(environ=None) -> tuple[dict, str]:
    """(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the source) from whichever launcher
    started this process: torchrun or the deepspeed launcher (the variables themselves), MPI (mpi4py:
    mpirun, mpiexec, srun --mpi=pmi2), Slurm (srun: SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS,
    first host of the node list), or none (one process). Computed once per process."""
    global _discovered
    if environ is None and _discovered is not None:
        return _discovered
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = {"RANK": env["RANK"], "LOCAL_RANK": env.get("LOCAL_RANK", "0"), "WORLD_SIZE": env["WORLD_SIZE"],
                 "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}
        result = found, "launcher variables"
    elif any(_count(env, n) > 1 for n in MPI_SIZE_VARIABLES):
        result = _from_mpi(env, next(n for n in MPI_SIZE_VARIABLES if _count(env, n) > 1)), "mpi"
    elif _count(env, "SLURM_STEP_NUM_TASKS") > 1:
        result = _from_slurm(env), "slurm"
    else:
        port = env.get("MASTER_PORT") or str(free_port())
        result = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": port}, "single process"
    if environ is None:
        _discovered = result
    return result


def world_size_from_env() -> int:
    return int(discover()[0]["WORLD_SIZE"])


def die_with_launcher(poll_seconds: float = 0.5) -> None:
    """End this rank when the process that started it is gone (its parent changes: `--nproc`, torchrun,
    the deepspeed launcher, mpirun's proxy or srun's step daemon was killed), instead of training on
    alone and writing into output_dir. A thread watches the parent; the parent-death signal of Linux
    would fire when the launcher's *thread* that started the rank ends, which no launcher promises.
    Ranks started from a shell with no launcher are not watched: `nohup peft-ds train` outlives it."""
    import threading
    import time

    parent = int(os.environ.get("PEFT_DS_LAUNCHER_PID") or os.getppid())

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        sys.stderr.write(f"peft-ds: error: rank {os.environ.get('RANK', '?')}: its launcher (pid {parent}) is gone; "
                         f"stopping this rank\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="peft-ds-launcher-watch", daemon=True).start()


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device (an index among the visible ones) of the rank with `local_rank` on its node.
    Every GPU of the node visible (torchrun, the deepspeed launcher, srun --gpu-bind=none): the local
    rank's. One visible (srun binding a GPU per task, CUDA_VISIBLE_DEVICES set per rank): that one, whatever
    the local rank (SLURM_LOCALID=3 there must not ask for device 3)."""
    if visible < 1:
        raise PeftDsError("CUDA is available but no GPU is visible to this process "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise PeftDsError(f"local rank {local_rank} sees only {visible} GPUs (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): give each rank all of its node's GPUs or "
                      f"exactly one (srun --gpu-bind=none, or --gpus-per-task=1)")


def local_device() -> torch.device:
    """This process's device: its GPU (`cuda_device_index` of LOCAL_RANK) when CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", cuda_device_index(int(os.environ.get("LOCAL_RANK") or 0), torch.cuda.device_count()))


def backend() -> str:
    """The torch.distributed backend: PEFT_DS_DIST_BACKEND if set (any backend string torch takes, such as
    `cpu:gloo,cuda:nccl`), else nccl with CUDA and gloo without."""
    return os.environ.get("PEFT_DS_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")


def init() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed through DeepSpeed once per process, with the
    ranks `discover` finds, and the group for host values (`host_group`). PEFT_DS_DIST_TIMEOUT (minutes,
    default 30) bounds every collective, so a lost rank ends the job instead of hanging it."""
    import datetime

    import deepspeed

    if not torch.distributed.is_initialized():
        variables, source = discover()
        if source != "single process":
            die_with_launcher()
        os.environ.update(variables)
        device = local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # DeepSpeed places the engine and zero.Init's partitions on cuda:LOCAL_RANK: the same device
            os.environ["LOCAL_RANK"] = str(device.index)
        timeout = datetime.timedelta(minutes=float(os.environ.get("PEFT_DS_DIST_TIMEOUT", "30")))
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False, timeout=timeout)
        global _had_process_group, _host
        _had_process_group = True
        _host = None if takes_cpu_tensors() else torch.distributed.new_group(backend="gloo", timeout=timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def describe() -> str:
    """'world size N over K nodes (names) via SOURCE, backend B, master ADDR:PORT': collective."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    names = all_gather_object(node)
    nodes = list(dict.fromkeys(names))
    _, source = discover()
    return (f"world size {len(names)} over {len(nodes)} node{'s' if len(nodes) > 1 else ''} ({', '.join(nodes)}) "
            f"via {source}, backend {torch.distributed.get_backend()}, master {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']}")


# ---- the collectives peft-ds issues itself ------------------------------------------------------
# DeepSpeed issues its own (gathers, reductions of the adapters' gradients) on the accelerator. peft-ds's
# own exchange host values only (loss sums, route digests, evaluation rows, barriers around files), and
# every one of them is issued here, in a gloo group on CPU tensors: the default group when its backend
# takes CPU tensors (gloo), else a gloo group over the same ranks made at `init` (NCCL takes CUDA tensors
# only: "No backend type associated with device type cpu").
_host = None  # the gloo group for host values, when the default group's backend does not take CPU tensors


def takes_cpu_tensors(group=None) -> bool:
    """Whether the backend of `group` (default: the default group) serves the CPU device type, as gloo's
    does ("cpu:gloo,cuda:gloo") and NCCL's does not ("cuda:nccl")."""
    config = str(torch.distributed.get_backend_config(group))
    return any(part.split(":")[0].strip() == "cpu" for part in config.split(","))


def host_group():
    """The group peft-ds's own collectives run in (None: the default group)."""
    return _host


def _several() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if _several():
        torch.distributed.all_reduce(t, group=_host)
    return t.tolist()


def same_on_all_ranks(value: int) -> bool:
    t = torch.tensor([value, -value], dtype=torch.float64)
    if _several():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_host)
    return t[0].item() == -t[1].item()


def all_gather_object(value) -> list:
    """Every rank's `value` (picklable), in rank order."""
    if not _several():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value, group=_host)
    return out


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=_host)


def shutdown() -> None:
    """End this rank's share of a run that finished (or stopped on a signal) on every rank: wait for all
    ranks, so that none closes its sockets while a peer still uses them, then destroy the process group.
    Collective; never on an error path, where a peer may be gone. The gloo threads outlive this call:
    ZeRO-3 keeps the engine, and through it the groups, for the life of the process; `exit_process`
    ends the process without tearing down the C++ runtime under them."""
    global _host
    if not torch.distributed.is_initialized():
        return
    barrier()
    torch.distributed.destroy_process_group()
    _host = None


def exit_process(code: int) -> None:
    """Exit with `code`. A process that held a process group leaves through os._exit after Python's
    atexit handlers and a flush: a normal exit tears down the interpreter and the C++ runtime while the
    gloo worker and socket threads still run (ZeRO-3 keeps them alive, see `shutdown`), and a thread that
    wakes meanwhile aborts the rank (SIGABRT, "terminate called without an active exception") after a
    run that finished: the job is reported failed (and requeued under Slurm)."""
    import atexit
    import sys

    if not _had_process_group:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_replace_on_launch = False  # see launcher_may_replace_process


def launcher_may_replace_process() -> None:
    """Called by the `peft-ds` command (cli.console): this process is the command's own, so `run_local`
    may replace it by the light launcher once the ranks run. A Python caller of cli.main keeps its
    process (run_local supervises the ranks in it)."""
    global _replace_on_launch
    _replace_on_launch = True


GATE_VARIABLE = "PEFT_DS_GATE_FD"  # a rank started before the launcher's checks passed waits on this pipe


def wait_at_gate(warm_up) -> None:
    """In a rank that `run_local` started while it still checks the run: `warm_up()` (the slow imports;
    its errors are the checks' to report), then wait for the launcher's verdict: a byte to go on, end of
    file (the checks failed, or the launcher is gone) to stop at once without a word, the launcher
    having said why. Nothing else is done or written before the gate."""
    import threading

    fd = os.environ.pop(GATE_VARIABLE, None)
    if fd is None:
        return

    def listen():  # a stop ends the rank at once, mid-import
        if os.read(int(fd), 1) != b"\1":
            os._exit(0)

    verdict = threading.Thread(target=listen, name="peft-ds-gate", daemon=True)
    verdict.start()
    try:
        warm_up()
    except Exception:
        pass
    verdict.join()
    os.close(int(fd))


def run_local(nproc: int, argv: list[str], preempted_code: int, check=lambda: None) -> int:
    """Start `python -m peft_ds ARGV` as `nproc` local ranks (torchrun's environment), forward
    SIGTERM/SIGUSR1/SIGINT to them, and stop them all as soon as one fails, so that a dead rank never
    leaves the others hanging in a collective. Returns 0, `preempted_code`, or the failing code (128 + N
    for a rank killed by signal N, as a shell reports it; each failing rank is named on stderr).

    `check()` runs every check before any rank trains; its error (PeftDsError: one line, exit 2) ends
    the command with no rank having done anything. From the command line the ranks start first and do
    their imports (seconds of CPU) while it runs, then wait at a gate (`wait_at_gate`); called from
    Python, it runs before any rank starts.

    From the command line this process (torch, transformers and DeepSpeed imported for the checks, some
    400 MiB) then replaces itself by `local_launcher.py` (standard library only, a few MiB): same pid, so
    PEFT_DS_LAUNCHER_PID, the ranks' parent and a signal sent to the command stay right; the forwarded
    signals are blocked from before the exec until the launcher handles them."""
    import signal
    import subprocess

    from . import local_launcher

    gate = os.pipe() if _replace_on_launch else None
    if gate is None:
        check()
    port = str(free_port())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": threads}
        env["PEFT_DS_LAUNCHER_PID"] = str(os.getpid())  # a rank that finds another parent stops at once
        if gate is not None:
            env[GATE_VARIABLE] = str(gate[0])
        procs.append(subprocess.Popen([sys.executable, "-m", "peft_ds", *argv], env=env,
                                      pass_fds=gate[:1] if gate else ()))
    if gate is not None:
        os.close(gate[0])
        try:
            check()
        except BaseException:
            os.close(gate[1])  # end of file: every rank stops quietly
            for p in procs:
                p.wait()
            raise
        os.write(gate[1], b"\1" * nproc)
        os.close(gate[1])
    pids = [p.pid for p in procs]
    if _replace_on_launch:
        signal.pthread_sigmask(signal.SIG_BLOCK, local_launcher.FORWARDED)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.execv(sys.executable, [sys.executable, "-I", local_launcher.__file__, str(preempted_code),
                                  *map(str, pids)])
    for p in procs:  # supervise reaps them (waitpid); subprocess must never wait for them too
        p.returncode = 0
    return local_launcher.supervise(pids, preempted_code)
