"""Real full and read-only file systems for tests, without root: a tmpfs of a chosen size mounted
in a private mount namespace of an unprivileged user namespace (`unshare -rm`). What runs in
it sees ENOSPC and EROFS from the kernel itself; the mount ends with the script.
"""

import os
import shutil
import subprocess

import pytest


def usable() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_private_mounts = pytest.mark.skipif(not usable(), reason="this kernel or container allows no user namespaces")


def run_with_tmpfs(mount_point, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run the shell `script` with a fresh tmpfs of `size_kb` KiB on `mount_point` (an existing
    empty folder); $MNT names it in the script, which may `mount -o remount,...` it."""
    setup = f'mount -t tmpfs -o size={size_kb}k revq-test "$MNT" && '
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", setup + script],
                          env={**os.environ, "MNT": str(mount_point)}, capture_output=True,
                          text=True, timeout=600)
