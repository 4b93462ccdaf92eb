"""Real full and read-only file systems for tests, without root: tmpfs mounts of a chosen size in a
private mount namespace of an unprivileged user namespace (`unshare -rm`). What runs there sees
ENOSPC and EROFS from the kernel itself; the mounts end with the namespace.

`PrivateMounts` is a preloaded server (tests/preloaded.py) started inside such a namespace: its
children run revq-pipe there, and its `mount` mounts or remounts a tmpfs for them.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from preloaded import PreloadedServer

UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")


class PrivateMounts(PreloadedServer):
    def __init__(self) -> None:
        super().__init__(launcher=UNSHARE)

    def mount(self, mount_point, options: str, logs) -> None:
        """A tmpfs mounted with `options` (size=64k,ro) on `mount_point`, an empty folder; with
        options "remount,...", the mount there changed."""
        where = [str(mount_point)] if options.startswith("remount") else ["revq-test", str(mount_point)]
        child = self.run("subprocess:run", ["mount", "-t", "tmpfs", "-o", options, *where], logs=logs, check=True)
        assert child.exitcode == 0, child.stderr


def unusable_because() -> str | None:
    """Why no tmpfs can be mounted in a private mount namespace here (None when one can)."""
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` command is not installed"
    with tempfile.TemporaryDirectory() as mount_point:
        probe = subprocess.run([*UNSHARE, "sh", "-c", 'mount -t tmpfs -o size=64k revq-probe "$MNT"'],
                               env={**os.environ, "MNT": mount_point}, capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"this kernel or container refuses a tmpfs in an unprivileged user namespace "
                f"(`{' '.join(UNSHARE)}`: {probe.stderr.strip() or probe.returncode})")
    return None


_REASON = unusable_because()
needs_private_mounts = pytest.mark.skipif(
    _REASON is not None, reason=f"mounts a small tmpfs, which needs a private mount namespace: {_REASON}")
