"""The installed stack: setup.py declares ranges with upper bounds on the majors of torch, transformers
and DeepSpeed; constraints.txt pins one exact point inside them for every requirement; and the suite
runs on exactly that point (scripts/install.sh installs from constraints.txt), so a tolerance tuned
to one stack is tested on that stack."""

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDED = ("torch", "transformers", "deepspeed")


def _name(name):
    return name.lower().replace("_", "-")


def requirements():
    """peft-ds's install_requires and its [test] extra, as installed from setup.py."""
    reqs = [Requirement(r) for r in metadata.requires("peft-ds")]
    return {_name(r.name): r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "test"})}


def pins():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    pinned = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and "+" not in version, f"constraints.txt: {line!r} is not an exact, label-free pin"
        pinned[_name(name)] = Version(version)
    return pinned


@pytest.mark.parametrize("package", BOUNDED)
def test_setup_declares_an_upper_bound(package):
    spec = requirements()[package].specifier
    assert any(s.operator == "<" for s in spec), f"{package}{spec} has no upper bound"
    upper = min(Version(s.version) for s in spec if s.operator == "<")
    assert upper.major <= pins()[package].major + 1


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for name, req in requirements().items():
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {req}"


def test_the_suite_runs_on_the_pinned_stack():
    for name, version in pins().items():
        installed = Version(metadata.version(name))
        assert Version(installed.public) == version, f"{name} {installed} installed, constraints.txt pins {version}"


# ---- a DeepSpeed op build killed midway ----------------------------------------------------------------

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()  # what torch's JIT build does before it builds (or loads) the op
print("held", flush=True)
time.sleep(600)
"""


def _age(directory, seconds):
    import time

    old = time.time() - seconds
    for name in os.listdir(directory):
        os.utime(os.path.join(directory, name), (old, old))


def test_a_killed_op_builds_lock_is_cleared_before_the_ranks_start(tmp_path):
    """torch's JIT build holds <TORCH_EXTENSIONS_DIR>/<op>/lock open while it builds and waits for any lock
    it finds to go; a builder killed midway leaves it, and every later run waited on it forever. A lock
    no process holds, in a build directory untouched for 10 minutes, is removed by the checks that run
    before any rank (peft-ds check here); a held one or a recent one (perhaps a build on another node) stays."""
    import signal
    import subprocess
    import sys

    from torch.utils.file_baton import FileBaton

    from peft_ds.distributed import STALE_LOCK_SECONDS, clear_stale_op_locks

    build = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "build.ninja").write_text("# a build that was under way\n")
    lock = build / "lock"
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _age(build, 2 * STALE_LOCK_SECONDS)
        assert clear_stale_op_locks(env) == [] and lock.exists()  # its builder is alive
        holder.send_signal(signal.SIGKILL)  # an OOM kill mid-build
        holder.wait()
    finally:
        holder.kill()
    assert lock.exists() and not FileBaton(str(lock)).try_acquire()  # torch's load would wait here for ever
    _age(build, STALE_LOCK_SECONDS // 2)
    assert clear_stale_op_locks(env) == [] and lock.exists()  # recent: perhaps a builder on another node
    _age(build, 2 * STALE_LOCK_SECONDS)
    config = tmp_path / "run.yaml"
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from launch import peft_ds, write_config

    write_config(config, tmp_path / "run")
    r = peft_ds("check", str(config), "--world-size", "2", env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not lock.exists() and f"removed the stale lock {lock}" in r.stderr
    assert FileBaton(str(lock)).try_acquire()  # the next load builds or loads the op
