"""Run the revq-pipe CLI in this process and SIGKILL it at a chosen moment (a child process of
tests/test_faults.py).

Usage: python kill_at.py TARGET NTH before|after [--encode-chunk-rows N] [--signal NAME] -- CLI ARGS...

TARGET names a function or method as module:qualname (revq_pipe.pipeline.storage.store:RowStore.commit,
zarr:Array.__setitem__, ...). On its NTH call the process sends itself SIGKILL, just before or
just after the call: no handler runs and nothing is cleaned up, as after a crash or the OOM
killer. --encode-chunk-rows makes encode cut chunks of N rows, so a few images span several.
--signal sends another signal instead: INT is Ctrl-C at exactly that moment (tests/test_interrupts.py),
STOP pauses the command there until the test sends SIGCONT.
"""

import functools
import importlib
import inspect
import os
import signal
import sys


def kill_on_call(target: str, nth: int, when: str, signum: int = signal.SIGKILL) -> None:
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
            os.kill(os.getpid(), signum)
        result = function(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signum)
        return result

    setattr(owner, name, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)


def main(argv: list[str]) -> None:
    split = argv.index("--")
    options, cli_args = argv[:split], argv[split + 1:]
    target, nth, when = options[0], int(options[1]), options[2]
    if "--encode-chunk-rows" in options:
        from revq_pipe.stages import encode

        rows = int(options[options.index("--encode-chunk-rows") + 1])
        encode.default_chunk_rows = lambda *shape: rows
    signum = signal.Signals["SIG" + options[options.index("--signal") + 1]] if "--signal" in options else signal.SIGKILL
    kill_on_call(target, nth, when, signum)
    from revq_pipe.cli import app

    app(cli_args)


if __name__ == "__main__":
    main(sys.argv[1:])
