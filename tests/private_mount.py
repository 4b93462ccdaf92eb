"""Real full and read-only file systems for tests, without root: a tmpfs of a chosen size mounted
in a private mount namespace of an unprivileged user namespace (`unshare -rm`). What runs in
it sees ENOSPC and EROFS from the kernel itself; the mount ends with the script.
"""

import os
import shutil
import subprocess
import tempfile

import pytest


def run_with_tmpfs(mount_point, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run the shell `script` with a fresh tmpfs of `size_kb` KiB on `mount_point` (an existing
    empty folder); $MNT names it in the script, which may `mount -o remount,...` it."""
    setup = f'mount -t tmpfs -o size={size_kb}k revq-test "$MNT" && '
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", setup + script],
                          env={**os.environ, "MNT": str(mount_point)}, capture_output=True,
                          text=True, timeout=600)


def unusable_because() -> str | None:
    """Why no private mount namespace can be made here (None when one can)."""
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` command is not installed"
    with tempfile.TemporaryDirectory() as mount_point:
        probe = run_with_tmpfs(mount_point, 64, "true")
    if probe.returncode != 0:
        return (f"this kernel or container refuses a tmpfs in an unprivileged user namespace "
                f"(`unshare --user --map-root-user --mount`: {probe.stderr.strip() or probe.returncode})")
    return None


_REASON = unusable_because()
needs_private_mounts = pytest.mark.skipif(
    _REASON is not None, reason=f"mounts a small tmpfs, which needs a private mount namespace: {_REASON}")
