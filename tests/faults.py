"""Faults for the tests of writers: a kill simulated at a chosen file-system step of `peft_ds.outputs`,
and a directory that takes no new file."""

import contextlib
import os
import shutil
import subprocess
import sys

from peft_ds import outputs

# What peft_ds.outputs does to the file system, step by step (file contents are written in between).
STEPS = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
         (os, "chmod"), (os, "open"), (shutil, "rmtree"), (outputs, "_exchange")]


class Killed(BaseException):
    """A simulated SIGKILL: from the step it hits on, the process changes nothing more on disk (its
    clean-up handlers included), as a real kill would leave it."""


@contextlib.contextmanager
def kill_at(monkeypatch, step=None):
    """Within the block, file-system step number `step` (0-based) of peft_ds.outputs and every later
    one raise Killed; with step None nothing is killed. Yields a dict whose "steps" counts the steps
    taken (or tried)."""
    seen = {"steps": 0}

    def wrap(function):
        def stepped(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") != "peft_ds.outputs":
                return function(*args, **kwargs)
            seen["steps"] += 1
            if step is not None and seen["steps"] > step:
                raise Killed(f"killed before {function.__name__}{args[:2]}")
            return function(*args, **kwargs)
        return stepped

    with monkeypatch.context() as patch:
        for owner, name in STEPS:
            patch.setattr(owner, name, wrap(getattr(owner, name)))
        yield seen


def without_exchange(monkeypatch):
    """peft_ds.outputs as on a file system without renameat2(RENAME_EXCHANGE): two renames per swap."""
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)


def tree(path):
    """{relative path: bytes (files) or None (directories)} of everything under `path`, hidden entries included."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), path)] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return found


@contextlib.contextmanager
def read_only_dir(path):
    """`path` made a directory in which no file can be created, for root too: a read-only bind mount
    as root (chmod does not stop root), mode 0555 otherwise."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield str(path)
        finally:
            os.chmod(path, 0o755)
        return
    subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], check=True, capture_output=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def assert_modes_follow(umask, *dirs):
    """Each directory and every file in it has the mode the umask gives a new one (0755 / 0644 under 022)."""
    for d in dirs:
        assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask, d
        for name in os.listdir(d):
            assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o666 & ~umask, (d, name)
