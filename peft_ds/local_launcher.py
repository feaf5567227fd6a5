"""What `peft-ds train --nproc N` stays as while its ranks run (`distributed.run_local`): watch the
rank processes, forward SIGTERM/SIGUSR1/SIGINT to them, stop them all as soon as one fails, and exit
with the run's code. Standard library only: the checks ran in this process with torch, transformers and
DeepSpeed imported, and it then replaces itself (exec, same pid, the ranks stay its children) by

    python -I peft_ds/local_launcher.py PREEMPTED_CODE PID...

so that it holds a few MiB instead of several hundred while the ranks train."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
HANDOFF_VARIABLE = "PEFT_DS_PREPARED"  # `peft-ds train --nproc`: the directory of its checked inputs
HANDOFF_PREFIX = "peft-ds-prepared-"  # its name's start (train.save_prepared writes it)


def remove_handoff(path: str | None) -> None:
    """Remove the hand-over directory `path` (only one of ours: the name starts with HANDOFF_PREFIX)."""
    if path and os.path.basename(path).startswith(HANDOFF_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def failure(rank: int, code: int) -> int:
    """The exit code for rank `rank` ending with `code` (a Popen-style code: -N for signal N), named
    on stderr; 128 + N for a rank killed by signal N, as a shell reports it."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        print(f"peft-ds: rank {rank} was killed by {name}", file=sys.stderr, flush=True)
        return 128 - code
    print(f"peft-ds: rank {rank} exited with code {code}", file=sys.stderr, flush=True)
    return code


def supervise(pids: list[int], preempted_code: int) -> int:
    """Wait for the ranks `pids` (children of this process, rank order), forwarding signals; stop them
    all when one fails. Returns 0, `preempted_code`, or the failing code."""
    codes: list[int | None] = [None] * len(pids)

    def poll() -> None:
        for rank, pid in enumerate(pids):
            if codes[rank] is None:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: count it as gone without a code
                    done, status = pid, 0
                if done:
                    codes[rank] = os.waitstatus_to_exitcode(status)

    def signal_all(signum) -> None:
        for rank, pid in enumerate(pids):
            if codes[rank] is None:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, lambda signum, frame: signal_all(signum)) for s in FORWARDED}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked across the exec (run_local)
    try:
        while True:
            poll()
            if all(c is not None for c in codes):
                break
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0, preempted_code)]
            if failed:
                signal_all(signal.SIGTERM)
                deadline = time.time() + 10
                while any(c is None for c in codes) and time.time() < deadline:
                    time.sleep(0.1)
                    poll()
                signal_all(signal.SIGKILL)
                for rank, pid in enumerate(pids):
                    if codes[rank] is None:
                        try:
                            os.waitpid(pid, 0)
                        except ChildProcessError:
                            pass
                return failure(*failed[0])
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        remove_handoff(os.environ.get(HANDOFF_VARIABLE))  # if the ranks ended before rank 0 removed it
    if preempted_code in codes:
        return preempted_code
    return next((failure(rank, c) for rank, c in enumerate(codes) if c != 0), 0)


if __name__ == "__main__":
    sys.exit(supervise([int(p) for p in sys.argv[2:]], int(sys.argv[1])))
