"""Where outputs land, and how: never over what a command reads, never half-written, never private.

Every file or directory peft-ds writes for a user goes through here (training checkpoints are
DeepSpeed's). A file is written under a hidden name beside its destination and renamed over it. A
directory is built whole in a hidden sibling, then swapped in: by renameat2(RENAME_EXCHANGE) where the
file system has it, so that the old or the new output is at the path at every instant; elsewhere by
two renames (old -> `.NAME.previous-*`, new -> NAME), and the next writer of the same path first puts a
previous output that a kill left between them back. Leftovers are named
`.NAME.{partial|previous}-<token>-<pid>@<host>[.ext]`: a writer removes those of the same path whose
process is gone (on this host; another host's are left alone, their writer may be at work). Files and directories get the modes the umask gives (safetensors and tempfile create
them 0600 / 0700, unreadable for colleagues on a shared cluster)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket

from .errors import PeftDsError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """`path` and, for a directory, everything in it: mode 0666 (files) / 0777 (directories) less the umask."""
    mask = umask()
    if not os.path.isdir(path) or os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


# ---- outputs apart from inputs, in a writable place -------------------------------------------------------


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_apart(out: str, option: str, inputs=(), enclosing=()) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` ((what, path) pairs), or that
    is or contains one of `enclosing` (an output may go inside those, as a run's `consolidated/`).
    Real paths are compared: symlinks, `..`, relative paths and hard links resolved. --force never
    overrides this: replacing the output would destroy what the command reads."""
    target = os.path.realpath(out)
    for what, path, inside_ok in [(w, p, True) for w, p in enclosing] + [(w, p, False) for w, p in inputs]:
        source = os.path.realpath(path)
        if target == source or _same(out, path):
            relation = "is"
        elif _within(source, target):
            relation = "contains"
        elif _within(target, source) and not inside_ok:
            relation = "lies inside"
        else:
            continue
        raise PeftDsError(f"{option} {out} {relation} {what} {path}, which this command reads; an output never "
                          f"replaces an input, with or without --force: choose another {option}")


def nearest_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def probe(path: str) -> None:
    """Create and remove the new file `path` (OSError when that cannot be done): permissions alone do
    not tell whether a directory takes a file (root, read-only mounts, ACLs)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.remove(path)


def check_writable(out: str, option: str = "--out") -> None:
    """The directory that will hold `out` exists or can be made, and takes a new file (`probe`)."""
    parent = os.path.dirname(os.path.abspath(out))
    existing = nearest_existing(parent)
    if not os.path.isdir(existing):
        raise PeftDsError(f"{option} {out} cannot be written: {existing} is not a directory")
    try:
        probe(_sibling(out, "partial") if existing == parent else os.path.join(existing, f".peft-ds-probe-{_owner()}"))
    except OSError as err:
        raise PeftDsError(f"{option} {out} cannot be written: no new file can be made in {existing} "
                          f"({err.strerror})") from None


# ---- staging, swapping, recovery ----------------------------------------------------------------------------


def _owner() -> str:
    return f"{secrets.token_hex(4)}-{os.getpid()}@{socket.gethostname()}"


def _sibling(path: str, kind: str) -> str:
    """A hidden name beside `path` for a `partial` (being written) or `previous` (being replaced) output,
    with `path`'s extension (tools that pick a format by extension still see it)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}-{_owner()}{os.path.splitext(name)[1]}")


def leftovers(path: str) -> list[tuple[str, str, int, str]]:
    """(kind, path, pid, host) of every staging or backup sibling of `path` (see the module doc)."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|previous)-[0-9a-f]{{8}}-(\d+)@(.+)"
                         rf"{re.escape(os.path.splitext(name)[1])}")
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match:
            found.append((match.group(1), os.path.join(parent, entry), int(match.group(2)), match.group(3)))
    return found


def _alive(pid: int, host: str) -> bool:
    """Whether the writer that made a leftover may still be at work (another host's: assumed so)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # this process is not writing that path now: a leftover of an earlier, failed call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _legacy_backups(path: str) -> list[str]:
    """Previous outputs that an earlier `peft-ds consolidate --force`, killed between its two renames,
    left aside as `.NAME.partial-<8 random characters>.old` (mkdtemp's suffix)."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.partial-[A-Za-z0-9_]{{8}}\.old")
    try:
        return [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if pattern.fullmatch(e)]
    except OSError:
        return []


def recover(path: str) -> str | None:
    """Undo what a killed writer of `path` left: a previous output put back when `path` is missing,
    then its staging and backups removed. Returns the backup restored, if any."""
    stale = [(kind, p) for kind, p, pid, host in leftovers(path) if not _alive(pid, host)]
    restored = None
    if not os.path.lexists(path):
        backups = [p for kind, p in stale if kind == "previous"] or _legacy_backups(path)
        if backups:
            restored = max(backups, key=lambda p: os.lstat(p).st_ctime_ns)  # the latest one moved aside
            os.replace(restored, path)
            stale = [(kind, p) for kind, p in stale if p != restored]
    for _, leftover in stale:
        _remove(leftover)
    return restored


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), a)


def _publish(staging: str, out: str) -> None:
    if not os.path.lexists(out):
        os.replace(staging, out)
    elif _exchange(staging, out):
        _remove(staging)  # now the previous output
    else:
        backup = _sibling(out, "previous")
        os.replace(out, backup)
        os.replace(staging, out)  # a kill before this: the next writer of `out` puts the backup back
        _remove(backup)


@contextlib.contextmanager
def replace_dir(out: str, merge: bool = False):
    """A fresh hidden sibling of `out` to build the output in. When the block ends, its modes follow
    the umask and it replaces `out` (module doc); with `merge`, an existing directory `out` keeps its
    other entries and each staged entry is renamed over its namesake. On an error it is removed."""
    recover(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    staging = _sibling(out, "partial")
    os.mkdir(staging)
    try:
        yield staging
        follow_umask(staging)
        if merge and os.path.isdir(out) and not os.path.islink(out):
            for entry in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, entry), os.path.join(out, entry))
            os.rmdir(staging)
        else:
            _publish(staging, out)
    except BaseException:
        if os.path.lexists(staging):
            _remove(staging)
        raise


@contextlib.contextmanager
def replace_file(out: str):
    """A hidden temporary path beside `out` (same extension) to write; when the block ends its mode
    follows the umask and it is renamed over `out` (a symlink at `out` is replaced, never written
    through). On an error it is removed."""
    recover(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    temp = _sibling(out, "partial")
    try:
        yield temp
        follow_umask(temp)
        os.replace(temp, out)
    except BaseException:
        if os.path.lexists(temp):
            _remove(temp)
        raise


def write_text(out: str, text: str) -> None:
    with replace_file(out) as temp, open(temp, "w") as f:
        f.write(text)
