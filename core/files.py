"""Safe files: atomic writes (a reader sees the old file or the whole new one, never a part), one
clear error when the disk is full or read-only, a lock that gives a run directory to one sweep, and
the one cache folder."""

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import platformdirs

from bitsweep.errors import BitsweepError

LOCK_NAME = ".bitsweep.lock"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(path: Path, exc: BaseException) -> BitsweepError | None:
    """A write to ``path`` that failed for want of space or permission, as one line with the fix; else None.

    Libraries written in Rust (safetensors) report the OS error only in their message, as "(os error 28)".
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found.group(1))
    if code in _NO_SPACE:
        fix = "free space on that disk or write elsewhere (for a sweep: `output:` in flows.yaml)"
    elif code in _NO_WRITE:
        fix = f"make {Path(path).parent} writable or write elsewhere (for a sweep: `output:` in flows.yaml)"
    else:
        return None
    return BitsweepError(f"{path}: cannot write ({os.strerror(code)}); {fix}, then run again: "
                         "what was written before is kept")


def _raise_storage(path: Path, exc: BaseException):
    error = storage_error(path, exc)
    if error is None:
        raise exc
    raise error from None


@contextlib.contextmanager
def atomic_path(dst: Path):
    """Yield a temporary path beside ``dst``; on success it replaces ``dst`` in one step."""
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    except OSError as exc:
        _raise_storage(dst, exc)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dst)
    except Exception as exc:
        _raise_storage(dst, exc)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def cache_dir() -> Path:
    """What is kept across runs (trained models, built kernels): $BITSWEEP_CACHE or the user cache folder."""
    return Path(os.environ.get("BITSWEEP_CACHE") or platformdirs.user_cache_dir("bitsweep"))


@contextlib.contextmanager
def run_lock(folder: Path):
    """Hold ``folder`` for one sweep: another sweep on it refuses at once, naming this holder.

    An ``flock`` on ``folder/.bitsweep.lock``: the OS releases it however the holder ends (SIGKILL
    included), so a dead holder's lock is simply taken over. Once held, the temporary files of
    writes a killed holder never finished are removed.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        _raise_storage(path, exc)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not said which"
            raise BitsweepError(f"{folder} is in use by another sweep ({holder}); wait for it to finish, or "
                                "give this sweep another `output:` folder") from None
        with contextlib.suppress(OSError):  # who holds it is for messages only: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}".encode(), 0)
        for leftover in folder.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)
