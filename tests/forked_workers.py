"""Dask worker processes forked from a preloaded forkserver, for the local clusters the tests start.

dask's default starts each worker as a fresh interpreter, which then imports torch, diffusers and
the stages for its first task: about 5 CPU-seconds a worker, and the tests start dozens. Instead a
forkserver imports them once and forks every worker from itself; the workers are processes of
their own all the same. The forkserver belongs to the process that starts the cluster (the test
session, or a preloaded child), so killing a child's session also ends its workers.
tests/test_cluster.py keeps one CLI run on dask's default (spawn), the start a user gets.
"""

from __future__ import annotations

import multiprocessing

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
