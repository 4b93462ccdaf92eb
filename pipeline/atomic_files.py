"""Small files that a kill must never leave torn: each is written to a temp file beside its place
and renamed over it, so a reader finds the old file or the new one (run dir files, manifests,
markers); and the JSON reading that goes with them, where a missing or torn file means "none".

Outputs may lie in folders other people can write to (a shared scratch space), so nothing here
follows a link that sits where a file goes: the temp file is made anew (whatever was at its name,
a killed writer's leftover or a planted link, is removed first, never written through), and the
rename replaces a link at the final name instead of following it. Every file gets the permissions
the user's umask gives a new file (writers that make their own temp file and rename it, as
safetensors does, would leave it 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from revq_pipe.pipeline.errors import UserError


def write_atomically(path: Path, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """`write(tmp)` to `path` + `suffix` beside it, then rename it over `path` (the suffix keeps a
    writer that picks its format from the extension, like matplotlib's, on the right one)."""
    tmp = path.with_name(path.name + suffix)
    mode = _new_empty_file(tmp)
    try:
        write(tmp)
        _set_mode(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json(path: Path, value: Any, *, indent: int | None = None) -> None:
    """`value` as JSON (and a final newline) at `path`, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=indent) + "\n"))


def read_json(path: Path) -> Any:
    """The JSON value at `path`, or None when it is missing, not a regular file (a FIFO would
    block the reader) or cannot be read as JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            return json.loads(file.read())
        except (OSError, ValueError):
            return None


def _new_empty_file(path: Path) -> int:
    """Make `path` a new, empty regular file of this process, removing whatever was there first (a
    link is removed, not followed); the permissions the umask gave it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _set_mode(path: Path, mode: int) -> None:
    """Give the regular file at `path` (never a link's target) the permissions `mode`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} was replaced by something other than a file while being written")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
