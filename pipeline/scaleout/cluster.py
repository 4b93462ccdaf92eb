"""Where `--cluster` work runs: a dask.distributed cluster started here, or one already running.

    local        one worker process per visible GPU (2 on a machine without CUDA)
    local:N      N worker processes on this machine
    tcp://HOST:PORT (or any dask address)   the scheduler of a cluster started elsewhere
                 (dask-jobqueue on SLURM, dask-kubernetes, `dask scheduler` + `dask worker`)

Workers run one task at a time (one GPU each). A local cluster on GPUs uses dask-cuda's
LocalCUDACluster when it is installed, else pins CUDA_VISIBLE_DEVICES per worker itself; on the
CPU each worker gets an equal share of the cores for torch (so its float sums round as those of
one process at that thread count, not as a one-process run on all the cores). Local workers are
started non-daemonic so that a task can start DataLoader processes that decode images.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from typing import TYPE_CHECKING, Iterator

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.paths import filesystem

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

LOCAL_SPEC = re.compile(r"local(?::(\d+))?")
ADDRESS_SPEC = re.compile(r"(tcp|tls|ws|wss|ucx)://[^\s/]+:\d+|[\w.-]+:\d+")
CPU_LOCAL_WORKERS = 2
CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 60  # how long a scheduler with no workers yet is given to get one
START_ATTEMPTS = 3  # starts of a local cluster whose worker processes die while starting
# What a local cluster's processes log on the user's terminal: a task's error reaches the command
# itself (one line), and a cluster stopped by Ctrl-C would print its workers' lost heartbeats.
WORKER_LOG_LEVEL = logging.CRITICAL


@contextlib.contextmanager
def cluster_client(spec: str) -> Iterator[Client]:
    """A dask Client for `spec` (see the module docstring), closed (with a local cluster) on exit."""
    if cluster_kind(spec) == "local":
        count = LOCAL_SPEC.fullmatch(spec).group(1)
        with _local_client(int(count) if count else _default_local_workers()) as client:
            yield client
    else:
        with _remote_client(spec) as client:
            yield client


def cluster_kind(spec: str) -> str:
    """"local" or "address": which kind of cluster `spec` names; anything else is a UserError."""
    local = LOCAL_SPEC.fullmatch(spec)
    if local:
        if local.group(1) and int(local.group(1)) < 1:
            raise UserError(f"`cluster={spec}`: a local cluster needs at least one worker")
        return "local"
    if ADDRESS_SPEC.fullmatch(spec):
        return "address"
    raise UserError(f"`cluster` takes local, local:N or a scheduler address such as tcp://host:8786, not {spec!r}")


def describe(client: Client) -> str:
    """`N dask workers` and, when there is one to open, where the dashboard is."""
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    text = f"{workers} dask worker{'s' if workers != 1 else ''}"
    link = client.dashboard_link
    # A scheduler serves the dashboard's pages only with bokeh installed; a remote one's we cannot see.
    if link and (client.cluster is None or importlib.util.find_spec("bokeh") is not None):
        text += f", dashboard {link}"
    elif link:
        text += " (pip install bokeh for dask's dashboard)"
    return text


def worker_hosts(client: Client) -> dict[str, int]:
    """How many workers each host runs: a task's share of its machine's CPUs follows from it."""
    counts: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        counts[info["host"]] = counts.get(info["host"], 0) + 1
    return counts


def shared_location(url: str, parameter: str) -> None:
    """Refuse a location (given as `parameter`) the workers cannot see: fsspec's memory:// lives
    inside one process."""
    fs, _ = filesystem(url)
    if "memory" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        raise UserError(f"`{parameter}={url}` is in this process's memory, which dask workers cannot reach: "
                        f"use a path or URL every worker can open")


def _default_local_workers() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_LOCAL_WORKERS


@contextlib.contextmanager
def _local_client(workers: int):
    import dask
    from distributed import Client

    # DataLoader workers are child processes of the dask worker; daemonic processes may have none.
    # The setting is read whenever a nanny (re)starts its worker, so it holds for the cluster's life.
    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    try:
        with dask.config.set({"distributed.worker.daemon": False}):
            with _started_local_cluster(workers) as cluster, Client(cluster) as client:
                try:
                    yield client
                finally:
                    # Workers that imported torch take seconds to exit, and the nanny kills them with
                    # a warning, after every result is written; after Ctrl-C the scheduler warns of
                    # the tasks it drops: neither is worth a line for the user.
                    dask_log.setLevel(logging.ERROR)
    finally:
        dask_log.setLevel(level)


def _started_local_cluster(workers: int):
    """`_local_cluster`, started again when one of its worker processes died while it started
    (LocalCluster raises "Nanny failed to start" and closes what it began); after START_ATTEMPTS
    starts, one line that says to run the command again (what it wrote so far is resumed)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _local_cluster(workers)
        except (RuntimeError, OSError, TimeoutError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if attempt == START_ATTEMPTS:
                raise UserError(f"the local dask cluster could not start ({reason}, {START_ATTEMPTS} tries): a worker "
                                f"process died while starting; run the same command again to go on") from None
            log.warning(f"a dask worker process died while the local cluster started ({reason}): starting it again")


def _local_cluster(workers: int):
    import torch
    from distributed import LocalCluster

    if not torch.cuda.is_available():
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # The nanny sets OMP_NUM_THREADS=1 in its workers by default; give torch each worker's share.
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, silence_logs=WORKER_LOG_LEVEL,
                            env={"OMP_NUM_THREADS": str(max(1, cpus // workers))})
    if importlib.util.find_spec("dask_cuda") is not None:
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(n_workers=workers, threads_per_worker=1, silence_logs=WORKER_LOG_LEVEL)
    return _pinned_gpu_cluster(workers, torch.cuda.device_count())


def _pinned_gpu_cluster(workers: int, gpus: int):
    """A local cluster whose worker i sees GPU i (round robin when there are more workers than GPUs)
    as its cuda:0, as dask-cuda does: a SpecCluster of nannies with their own CUDA_VISIBLE_DEVICES."""
    from distributed import Nanny, Scheduler, SpecCluster

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
    specs = {i: {"cls": Nanny, "options": {"nthreads": 1, "silence_logs": WORKER_LOG_LEVEL,
                                           "env": {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]}}}
             for i in range(workers)}
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":8787"}},
                       silence_logs=WORKER_LOG_LEVEL)


@contextlib.contextmanager
def _remote_client(address: str):
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        raise UserError(f"cannot reach the dask scheduler at {address}: {str(err).splitlines()[0]}") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise UserError(f"the dask scheduler at {address} has no workers (waited {WORKER_WAIT_S} s)") from None
        yield client
