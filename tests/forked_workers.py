"""Dask worker processes forked from a preloaded forkserver, for the local clusters the tests start.

dask's default starts each worker as a fresh interpreter, which then imports torch, diffusers and
the stages for its first task: about 5 CPU-seconds a worker, and the tests start dozens. Instead a
forkserver imports them once and forks every worker from itself; the workers are processes of
their own all the same. The forkserver belongs to the process that starts the cluster (the test
session, or a preloaded child), so killing a child's session also ends its workers. A preloaded
child, which has imported them all, forks its forkserver from itself at its start
(`start_forkserver_by_fork`) instead of starting an interpreter that imports them again.
tests/test_cluster.py keeps one CLI run on dask's default (spawn), the start a user gets.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

# The stages' task functions and the VAE classes the tests' workers load.
WORKER_PRELOAD = ("distributed", "revq_pipe.stages.encode", "revq_pipe.stages.export_tokens",
                  "diffusers.models.autoencoders.autoencoder_dc", "diffusers.models.autoencoders.autoencoder_kl")


def fork_workers():
    """From now on, this process's local clusters fork their workers from its forkserver (started at
    its first cluster), which imports WORKER_PRELOAD; also a context manager that ends it."""
    import dask
    import distributed.utils

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    # distributed sets its own preload list (no torch) on first use unless told it has: a speed-up
    # only, so a distributed that renames this flag costs time, never a result.
    distributed.utils._forkserver_preload_set = True
    return dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})


def start_forkserver_by_fork() -> None:
    """Start this process's forkserver now as a fork of this process, which has imported
    WORKER_PRELOAD already: Python's own start runs a fresh interpreter that imports them all again
    (about 4.5 CPU-s, once per preloaded child that starts a cluster). The fork runs the very
    command Python would have run, with the same descriptors passed. Call it while this process has
    one thread: a fork copies no other."""
    from multiprocessing import forkserver, resource_tracker, util

    resource_tracker.ensure_running()  # a small interpreter of its own, as Python starts it
    spawn = util.spawnv_passfds
    util.spawnv_passfds = _fork_and_run
    try:
        forkserver.ensure_running()
    finally:
        util.spawnv_passfds = spawn


def _fork_and_run(path: str, args: list[str], passfds) -> int:
    """spawnv_passfds's part for `python -c COMMAND`: run COMMAND in a fork; its pid."""
    command = args[-1]
    assert args[-2] == "-c", args
    # Besides the passed descriptors a fresh interpreter would hold none: the fork must not keep the
    # other end of a passed pipe open (the forkserver sees its parent end by that pipe's EOF).
    passed = {_identity(fd) for fd in passfds}
    pid = os.fork()
    if pid == 0:
        try:
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd not in passfds and _identity(fd) in passed:
                    os.close(fd)
            exec(command, {})
        except Exception:
            traceback.print_exc()
        finally:
            os._exit(0)  # never the parent's atexit handlers or interpreter teardown
    return pid


def _identity(fd: int):
    try:
        stat = os.fstat(fd)
    except OSError:  # listdir's own descriptor, closed by now
        return None
    return stat.st_dev, stat.st_ino
