"""A dask worker preload (DASK_DISTRIBUTED__WORKER__PRELOAD) that makes a worker process die at a
known moment, for tests/test_cluster_faults.py: no timing, no polling.

REVQ_TEST_WORKER_FAULT says when:
- `start`: while the worker starts (its nanny then reports "Nanny failed to start");
- `call:MODULE:QUALNAME:N`: at the Nth call of that function in the worker (a task in progress).
The process sends itself SIGKILL, as the OOM killer would. With REVQ_TEST_WORKER_FAULT_ONCE naming
a file, only the first worker process to get there dies (it creates the file); without it, every one.
"""

import functools
import importlib
import os
import signal


def dask_setup(worker) -> None:
    fault = os.environ.get("REVQ_TEST_WORKER_FAULT", "")
    if fault == "start":
        _die()
    elif fault.startswith("call:"):
        _, module, qualname, nth = fault.split(":")
        _die_at_call(module, qualname, int(nth))


def _die() -> None:
    once = os.environ.get("REVQ_TEST_WORKER_FAULT_ONCE")
    if once is not None:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # another worker process died already
    os.kill(os.getpid(), signal.SIGKILL)


def _die_at_call(module: str, qualname: str, nth: int) -> None:
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    function = getattr(owner, name)
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            _die()
        return function(*args, **kwargs)

    setattr(owner, name, wrapper)
