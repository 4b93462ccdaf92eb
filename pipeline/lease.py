"""Leases: one job at a time writes a store, a run dir or an output folder.

A lease is the file `.revq-lease` inside the output, naming the job that writes it (job id, pid,
host, command, start time). Every process of that job keeps the file open with a shared `flock`.
The kernel drops a process's lock however the process ends (SIGKILL included; on NFS the server
does when the client's own lease runs out), so a lease file that no process holds is stale and is
taken over, with no guessing from pids (which the system reuses) or clocks.

Tasks of one job share its lease: the job id is REVQ_JOB_ID when set - a scale-out driver
exports it to the chunk-range tasks that write one store together - and otherwise fresh for each
process. A process of another job is refused with a UserError naming the holder; commands check
that before their heavy imports too (`refuse_when_held`).

Outputs behind a remote URL (s3://, gs://, memory://) are not leased: object stores offer no lock
that a killed writer releases. Nor are local ones on a file system without `flock` (a warning says
so).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from revq_pipe.pipeline.atomic_files import read_json
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import local_path

log = logging.getLogger(__name__)

LEASE_NAME = ".revq-lease"
JOB_ENV = "REVQ_JOB_ID"
_THIS_PROCESS_JOB = uuid.uuid4().hex
# A holder rewrites the record between taking the file exclusively and sharing it: readers that
# catch it half-written look again, for up to this long.
RECORD_WAIT_S = 2.0


class LeaseHeld(UserError):
    """Another job is writing the output."""


def job_id() -> str:
    """This process's job: REVQ_JOB_ID when set, else one of its own."""
    return os.environ.get(JOB_ENV) or _THIS_PROCESS_JOB


class Lease:
    """A held lease on `folder`; `release` (or leaving the `with` block) gives it up."""

    def __init__(self, folder: Path, fd: int, created_folder: bool):
        self.folder, self._fd, self._created_folder = folder, fd, created_folder

    @property
    def path(self) -> Path:
        return self.folder / LEASE_NAME

    @classmethod
    def acquire(cls, folder: Path, command: str) -> "Lease | None":
        """Take or join the lease on `folder` (created, with its parents, when missing) for
        `command`; None where the file system has no locks. Raises LeaseHeld for another live job."""
        created = _make_folder(folder)
        record = {"job": job_id(), "pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = folder / LEASE_NAME
        while True:
            fd = _open_lease_file(path)
            try:
                held = _try_lock(fd, fcntl.LOCK_EX)
                if held is None:
                    os.close(fd)
                    log.warning(f"{folder}: the file system offers no locks, so nothing stops another job "
                                f"from writing here at the same time")
                    return None
                if not _still_at(fd, path):  # a releasing holder removed this file: open the new one
                    os.close(fd)
                    continue
                if held:
                    _write_record(fd, record)
                    # Share it with this job's other tasks. The conversion is not atomic: another job
                    # may take the file in between, and then the record is its own.
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    holder = _read_record(path)
                elif (holder := _read_record(path)).get("job") == record["job"]:
                    fcntl.flock(fd, fcntl.LOCK_SH)  # joining: waits out a takeover in progress
                    holder = _read_record(path)
                if holder.get("job") == record["job"] and _still_at(fd, path):
                    return cls(folder, fd, created)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            raise _held(folder, holder)

    def release(self) -> None:
        """Give the lease up; the last holder removes the lease file (and the folder, when the lease
        made it and nothing else was written there)."""
        if self._fd < 0:
            return
        try:
            if _try_lock(self._fd, fcntl.LOCK_EX) and _still_at(self._fd, self.path):
                self.path.unlink()
                if self._created_folder:
                    with contextlib.suppress(OSError):  # not empty: the output stays
                        self.folder.rmdir()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_when_held(folder: Path) -> None:
    """Raise LeaseHeld when another job holds the lease on `folder` now: for checks made before
    the lease is taken (a busy output is named as such, not as one that holds finished work). The
    probe holds the file for an instant; the lease itself is checked again when taken."""
    path = folder / LEASE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # no lease, or no regular file (refused when the lease is taken)
        return
    try:
        free = _try_lock(fd, fcntl.LOCK_EX) is not False
    finally:
        os.close(fd)
    if not free and (holder := _read_record(path)).get("job") != job_id():
        raise _held(folder, holder)


@contextlib.contextmanager
def output_lease(url: str | Path, command: str) -> Iterator[Lease | None]:
    """Hold the lease on the output at `url` (a store, run dir or folder, created when missing)
    while the block runs; remote outputs get none."""
    path = local_path(url)
    if path is None:
        yield None
        return
    lease = Lease.acquire(path, command)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def contents(folder: Path) -> list[Path]:
    """What `folder` holds besides a lease (nothing when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.name != LEASE_NAME)


def refuse_non_folder(folder: Path) -> None:
    """Refuse a path where a folder should go that is something else (a file, a dangling link)."""
    if not folder.is_dir() and (folder.exists() or folder.is_symlink()):
        raise UserError(f"{folder} exists and is not a folder")


def _make_folder(folder: Path) -> bool:
    """Create `folder` (and parents); whether it was missing. Problems are user errors."""
    if folder.is_dir():
        return False
    refuse_non_folder(folder)
    try:
        folder.mkdir(parents=True)
    except FileExistsError:  # made by a task of this job meanwhile
        return False
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror}") from err
    return True


def _open_lease_file(path: Path) -> int:
    """The lease file at `path`, opened (made when missing) for reading and writing. Only a regular
    file will do: the lease is written through its descriptor, and a link planted there by someone
    who can write the folder would otherwise lead that write onto any file the user may write."""
    refusal = UserError(f"{path} is not a regular file (a link, a folder or a device): revq-pipe writes its "
                        f"lease only into a file of its own; remove it if you did not put it there")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            raise refusal from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refusal
    return fd


def _try_lock(fd: int, operation: int) -> bool | None:
    """flock without waiting: True when taken, False when another holds it, None without locks."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file is still the one at `path` (not unlinked or replaced since)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _write_record(fd: int, record: dict) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_record(path: Path) -> dict:
    """The holder's record; {} when it stays unreadable (a holder from another tool or version)."""
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        record = read_json(path)
        if isinstance(record, dict):
            return record
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


def _held(folder: Path, holder: dict) -> LeaseHeld:
    return LeaseHeld(f"{folder} is being written by another job: {_describe(holder)}; wait for it to end, or "
                     f"stop it (tasks of one job share the lease through {JOB_ENV})")


def _describe(record: dict) -> str:
    if not record:
        return "a writer whose lease record cannot be read"
    return (f"`revq-pipe {record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"since {record.get('started', '?')})")
