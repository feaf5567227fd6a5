"""`peft_ds.outputs`: a directory or file replaced so that a kill at any step leaves the previous
output readable (or put back by the next writer) and no leftover after the next write; outputs
that would replace an input refused (symlinks, `..`, relative paths, hard links); unwritable places
refused; modes that follow the umask."""

import os
import subprocess
import sys

import pytest
from faults import Killed, kill_at, read_only_dir, tree, without_exchange

from peft_ds import outputs
from peft_ds.errors import PeftDsError

OLD = {"weights.bin": b"old weights", "config.json": b'{"old": true}'}
NEW = {"weights.bin": b"new weights!", "config.json": b'{"new": true}', "extra.txt": b"new"}


def write_dir(out, files):
    with outputs.replace_dir(str(out)) as staging:
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)


def steps_of(monkeypatch, action):
    with kill_at(monkeypatch) as seen:
        action()
    return seen["steps"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_directory_replaced_safely_at_every_kill_point(tmp_path, monkeypatch, swap):
    if swap == "two renames":
        without_exchange(monkeypatch)
    out = tmp_path / "adapter"
    write_dir(out, OLD)
    total = steps_of(monkeypatch, lambda: write_dir(out, NEW))
    assert total >= 4
    outcomes = set()
    for step in range(total):
        write_dir(out, OLD)
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            write_dir(out, NEW)
        if swap == "exchange" or out.exists():
            assert tree(out) in (OLD, NEW), step  # whole, old or new, at every instant
        else:  # between the two renames: the next writer of the path puts the previous output back first
            assert outputs.recover(str(out))
            assert tree(out) == OLD
            outcomes.add("put back")
        outcomes.add("new" if tree(out) == NEW else "old")
        write_dir(out, NEW)
        assert tree(out) == NEW and os.listdir(tmp_path) == ["adapter"], (step, os.listdir(tmp_path))
    assert outcomes == ({"old", "new"} if swap == "exchange" else {"old", "new", "put back"})


def test_file_replaced_safely_at_every_kill_point(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    outputs.write_text(str(out), "old")
    total = steps_of(monkeypatch, lambda: outputs.write_text(str(out), "new"))
    for step in range(total):
        outputs.write_text(str(out), "old")
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            outputs.write_text(str(out), "new")
        assert out.read_text() in ("old", "new")
        outputs.write_text(str(out), "new")
        assert out.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_leftovers_of_live_writers_are_left_alone(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(done.stdout), os.getppid()
    host = os.uname().nodename
    names = {f".adapter.partial-0123abcd-{dead}@{host}": False, f".adapter.previous-0123abcd-{dead}@{host}": False,
             f".adapter.partial-4567abcd-{live}@{host}": True, f".adapter.partial-89abcdef-{dead}@other-node": True,
             ".adapter.partial-by-hand": True, ".other.partial-0123abcd-1@x": True}
    for name in names:
        (tmp_path / name).mkdir()
    assert outputs.recover(str(out)) is None
    assert set(os.listdir(tmp_path)) == {"adapter"} | {name for name, kept in names.items() if kept}


def test_an_earlier_versions_backup_is_put_back(tmp_path):
    """What `consolidate --force` before this module left when killed between its renames: --out missing,
    the previous output in `.NAME.partial-XXXXXXXX.old`; the next writer puts it back, then replaces it."""
    backup = tmp_path / ".adapter.partial-k3_x9q2a.old"
    backup.mkdir()
    (backup / "config.json").write_text("old")
    (tmp_path / ".adapter.partial-zz9_ab12").mkdir()  # its staging: not ours to judge, left alone
    write_dir(tmp_path / "adapter", NEW)
    assert tree(tmp_path / "adapter") == NEW
    assert sorted(os.listdir(tmp_path)) == [".adapter.partial-zz9_ab12", "adapter"]
    backup.mkdir()
    (backup / "config.json").write_text("old")
    os.rename(tmp_path / "adapter", tmp_path / "elsewhere")
    assert outputs.recover(str(tmp_path / "adapter")) == str(backup)
    assert tree(tmp_path / "adapter") == {"config.json": b"old"}


def test_outputs_that_would_replace_an_input_are_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step2").mkdir(parents=True)
    (run / "data.json").write_text("[]")
    os.symlink(run, tmp_path / "link")
    os.link(run / "data.json", tmp_path / "hardlink.json")
    monkeypatch.chdir(tmp_path)
    inputs = [("the checkpoint directory", str(run / "checkpoints"))]
    cases = {"run/checkpoints": "is", "link/checkpoints/step2": "lies inside", "run": "contains",
             str(run / "checkpoints" / ".." / "checkpoints" / "step2" / "x"): "lies inside", ".": "contains"}
    for out, relation in cases.items():
        with pytest.raises(PeftDsError, match=f"--out {out} {relation} the checkpoint directory"):
            outputs.check_apart(out, "--out", inputs)
    with pytest.raises(PeftDsError, match="is the data file"):
        outputs.check_apart("hardlink.json", "--out", [("the data file", str(run / "data.json"))])
    # an enclosing directory may hold the output, but not be it or lie inside it
    outputs.check_apart("run/consolidated", "--out", enclosing=[("the run directory", "run")])
    with pytest.raises(PeftDsError, match="is the run directory"):
        outputs.check_apart("link", "--out", enclosing=[("the run directory", "run")])
    outputs.check_apart("run2", "--out", inputs)  # a name that merely starts like an input


def test_unwritable_places_are_refused(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        with pytest.raises(PeftDsError, match="cannot be written: no new file can be made in"):
            outputs.check_writable(os.path.join(ro, "out", "adapter"))
        assert os.listdir(ro) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeftDsError, match="is not a directory"):
        outputs.check_writable(str(tmp_path / "file" / "results.json"))
    outputs.check_writable(str(tmp_path / "new" / "deeper" / "results.json"))
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"]  # nothing made by the check


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_modes_follow_the_umask(tmp_path, mask):
    import torch
    from safetensors.torch import save_file

    previous = os.umask(mask)
    try:
        with outputs.replace_dir(str(tmp_path / "out")) as staging:
            save_file({"a": torch.zeros(2)}, os.path.join(staging, "w.safetensors"))  # created 0600
            os.mkdir(os.path.join(staging, "sub"))
        with outputs.replace_file(str(tmp_path / "f.safetensors")) as temp:
            save_file({"a": torch.zeros(2)}, temp)
    finally:
        os.umask(previous)
    assert outputs.umask() == previous
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == 0o777 & ~mask
    assert mode(tmp_path / "out" / "w.safetensors") == mode(tmp_path / "f.safetensors") == 0o666 & ~mask
