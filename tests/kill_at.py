"""Run the revq-pipe CLI in this process and have it send itself a signal at a chosen moment (a
child process of the fault tests, forked by tests/preloaded.py).

TARGET names a function or method as module:qualname (revq_pipe.pipeline.storage.store:RowStore.commit,
zarr:Array.__setitem__, ...). On its NTH call the process sends itself the signal, just before or
just after the call. SIGKILL (the default): no handler runs and nothing is cleaned up, as after a
crash or the OOM killer; SIGINT: Ctrl-C at exactly that moment; SIGSTOP: paused there until the
test sends SIGCONT.
"""

import functools
import importlib
import inspect
import os
import signal


def kill_on_call(target: str, nth: int, when: str, signal_number: int) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = inspect.getattr_static(owner, name)
    function = original.__func__ if isinstance(original, classmethod) else original
    calls = 0

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal_number)
        result = function(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal_number)
        return result

    setattr(owner, name, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)


def run_cli(cli_args: list[str], target: str | None = None, nth: int = 1, when: str = "before", *,
            signal_name: str = "SIGKILL", encode_chunk_rows: int | None = None) -> None:
    """The CLI with `cli_args`, signalled at the nth call of target (when one is named).
    `encode_chunk_rows` makes encode cut chunks of that many rows, so a few images span several."""
    if encode_chunk_rows is not None:
        from revq_pipe.stages import encode

        encode.default_chunk_rows = lambda *shape: encode_chunk_rows
    if target is not None:
        kill_on_call(target, nth, when, signal.Signals[signal_name])
    from revq_pipe.cli import app

    app(cli_args)


def run_stuck(cli_args: list[str], times: str) -> None:
    """The CLI with `cli_args` (a decode command) whose work never unwinds after Ctrl-C: decode is
    replaced by a function that sends its process SIGINT (and again in its `finally` when `times`
    is "twice"), then waits ten minutes."""
    import time

    from revq_pipe.stages import decode

    def stuck(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(600)
        finally:
            if times == "twice":
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(600)

    decode.decode = stuck
    from revq_pipe.cli import app

    app(cli_args)
