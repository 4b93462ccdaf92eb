"""Child processes that start with torch, diffusers and revq-pipe's stages already imported.

Importing them costs a child about 5 CPU-seconds, and what the stages import only where used
(diffusers for the rectifier's blocks, matplotlib for metrics.png) 2 more: a tiny fit in a child
took 2.8 s with the stages alone preloaded, 0.9 s with those too. The kill scenarios start dozens
of children. So one server process (this file run as a script, started once per test session by
conftest's `preloaded` fixture) imports them once and forks every child from itself. The children are real
processes of their own, as a command started from a shell is: each runs in a session of its own
(`os.killpg(child.pid, ...)` ends it with every process it started), with Python's own Ctrl-C
handler (a test run started in the background, where SIGINT is ignored, would otherwise hand that
on), its stdin on /dev/null and its stdout and stderr in files. A child that runs past its time
limit ends by SIGALRM.

Protocol: the test writes one JSON request per line to the server's stdin,
{"call": "module:function", "args": [...], "kwargs": {...}, "logs": DIR, "timeout_s": N, "cpus": N or null,
 "forkserver": true or false};
the server answers {"pid": P} at once and {"exitcode": C} when the child has ended (C is -9 after
a SIGKILL, as subprocess reports it). One child runs at a time.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from forked_workers import WORKER_PRELOAD, fork_workers, start_forkserver_by_fork

# The stages, and what they import only where used: diffusers (the VAEs, the rectifier's blocks:
# WORKER_PRELOAD), matplotlib (metrics.png), dask.array (a finished store's statistics), webdataset.
PRELOAD = ("revq_pipe.cli", "revq_pipe.stages.decode", "revq_pipe.stages.fit", *WORKER_PRELOAD, "matplotlib.figure",
           "matplotlib.backends.backend_agg", "dask.array", "webdataset")
# How often the test process (conftest) and the children collect garbage. Both hold a large heap
# (torch, diffusers, matplotlib, dask; the test process every test module too) that each full
# collection walks: at Python's thresholds (700, 10, 10) collections took 17.6 CPU-s of the test
# process in a suite run, at these 7.9 (measured with gc.callbacks). Only cyclic garbage waits longer.
GC_THRESHOLDS = (10_000, 10, 100)


class PreloadedServer:
    """The test session's side: starts the server, asks it for children."""

    def __init__(self, launcher: tuple[str, ...] = ()) -> None:
        """`launcher`: a command that runs the server, e.g. `unshare ...` for a namespace of its own."""
        # Unbuffered: a reply waiting in a buffer would escape `Child.poll`'s select.
        self._server = subprocess.Popen([*launcher, sys.executable, __file__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, bufsize=0)

    def start(self, call: str, *args, logs: Path, timeout_s: int = 600, cpus: int | None = None,
              forkserver: bool = False, **kwargs) -> Child:
        """Fork a child that calls `call` ("module:function") with args and kwargs (JSON values),
        on at most `cpus` of the machine's CPUs when given. `forkserver`: the call starts a local
        cluster, whose workers a forkserver forked from the child at its start will fork."""
        request = {"call": call, "args": args, "kwargs": kwargs, "logs": str(logs), "timeout_s": timeout_s,
                   "cpus": cpus, "forkserver": forkserver}
        self._server.stdin.write((json.dumps(request) + "\n").encode())
        return Child(self, self._reply()["pid"], Path(logs))

    def run(self, call: str, *args, logs: Path, **kwargs) -> Child:
        """`start`, then wait for the child to end."""
        child = self.start(call, *args, logs=logs, **kwargs)
        child.wait()
        return child

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait()

    def _replied(self) -> bool:
        return bool(select.select([self._server.stdout], [], [], 0)[0])

    def _reply(self) -> dict:
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded server ended (status {self._server.wait()})")
        return json.loads(line)


@dataclass
class Child:
    server: PreloadedServer
    pid: int
    logs: Path
    exitcode: int | None = None

    def wait(self) -> int:
        if self.exitcode is None:
            self.exitcode = self.server._reply()["exitcode"]
        return self.exitcode

    def poll(self) -> int | None:
        """The exit status if the child has ended, else None."""
        return self.wait() if self.exitcode is not None or self.server._replied() else None

    @property
    def stdout(self) -> str:
        return (self.logs / "stdout").read_text()

    @property
    def stderr(self) -> str:
        return (self.logs / "stderr").read_text()


def serve() -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    fork_workers()  # in a child's session, by a forkserver of the child's own (tests/forked_workers.py)
    # What is imported now no collection in a child walks again (nor copies, writing its headers).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the test run: the server ends when its stdin does
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _answer({"exitcode": os.waitstatus_to_exitcode(status)})
    os._exit(0)  # nothing is left to flush; tearing down torch's and dask's modules takes seconds


def _answer(reply: dict) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def _child(request: dict) -> None:
    """Become a command's process, run the call, and exit with its status (never returns)."""
    code = 1
    try:
        os.setsid()
        if request["cpus"]:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:request["cpus"]])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.alarm(request["timeout_s"])
        logs = Path(request["logs"])
        logs.mkdir(parents=True, exist_ok=True)
        _redirect(0, os.devnull, os.O_RDONLY)
        _redirect(1, logs / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        _redirect(2, logs / "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        if request["forkserver"]:  # now, while this process has one thread
            start_forkserver_by_fork()
        module, function = request["call"].split(":")
        getattr(importlib.import_module(module), function)(*request["args"], **request["kwargs"])
        code = 0
    except SystemExit as exit:  # the CLI's way out: its status
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _redirect(fd: int, path, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


if __name__ == "__main__":
    serve()
