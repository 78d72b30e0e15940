"""One run per output folder: an exclusive lock that run_exp.py holds on its --save_path.

The lock is `flock` on the file `.run_exp.lock` in the folder, which names the holder (pid,
host, start time, command). The kernel releases it when the holder exits, however it exits: a
file left by a killed run is a lock nobody holds, and the next run takes it over with a note.
A run that ends removes the file. Runs one after another into one folder stay allowed.

Network file systems: Linux's NFS client implements flock with NFS byte-range locks (NLM on
NFSv3, NFSv4's own), which the server arbitrates between hosts, so a run on another host is
refused too; not where the share is mounted `nolock` or `local_lock=flock|all`, where the lock
only sees runs on the same host. Where the file system has no locks at all (Lustre without
`-o flock` answers ENOSYS), the run goes ahead with a warning that it cannot tell.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence

from ntk_evolution.utils import UserError

LOCK_FILE = ".run_exp.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_record(argv: Sequence[str] | None) -> dict:
    """Who holds the lock: this process, its host, when, and its command line."""
    command = ["run_exp.py", *(sys.argv[1:] if argv is None else argv)]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(command),
    }


def describe(holder: dict | None) -> str:
    """'pid 123 on host node7, started 2026-12-03T09:00:00+00:00'."""
    if not holder:
        return "a run that has not yet written its name"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}"
    )


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?"}
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def _still_at(fd: int, path: str) -> bool:
    """Whether `fd` is still the file at `path` (an ending run unlinks its lock file: a lock
    taken on the unlinked file would guard nothing)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def acquire(folder: str, flag: str, argv: Sequence[str] | None = None) -> int | None:
    """Lock `folder` for this process: the locked file's descriptor, or None where the file
    system has no locks (after a warning). Another live run's lock is a UserError naming it."""
    path = os.path.join(folder, LOCK_FILE)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create the lock file {path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"{flag} {folder} is in use by another run_exp.py ({describe(holder)}); wait "
                f"for it to end or choose another {flag}"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_LOCKS:
                raise UserError(f"cannot lock {path}: {err.strerror}") from None
            print(
                f"warning: the file system of {folder} has no file locks ({err.strerror}): a "
                "second run into it at the same time would not be refused",
                file=sys.stderr,
            )
            return None
        if not _still_at(fd, path):
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous is not None:
            print(
                f"note: taking over {path}, left by a run_exp.py that ended without releasing it "
                f"({describe(previous)}; killed?)"
            )
        _write_holder(fd, holder_record(argv))
        return fd


def release(fd: int | None, folder: str) -> None:
    """Remove the lock file (while still holding it) and unlock."""
    if fd is None:
        return
    path = os.path.join(folder, LOCK_FILE)
    try:
        if _still_at(fd, path):
            os.unlink(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(
    folder: str, flag: str, argv: Sequence[str] | None = None, enabled: bool = True
) -> Iterator[None]:
    """Hold the lock on `folder` for the duration of the block (`enabled`: this process
    writes; the other processes of a multi-host run do not lock)."""
    fd = acquire(folder, flag, argv) if enabled else None
    try:
        yield
    finally:
        release(fd, folder)
