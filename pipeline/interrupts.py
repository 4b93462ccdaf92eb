"""Ctrl-C ends every command within seconds, whatever it is doing.

The first SIGINT raises KeyboardInterrupt in the main thread as Python does by default: the
command unwinds (closing its DataLoader workers, writer thread, dask cluster), says how to go on
and exits with status 130. Python runs that handler only between bytecodes of the main thread,
though, so a main thread inside one long call (a big tensor operation, a collective waiting for
processes that already stopped, a dask cluster shutting down its workers) would keep the user
waiting. So the signal is also written to a pipe (`signal.set_wakeup_fd`, from C, at once) that a
watcher thread reads: if the command has not ended GRACE_S seconds later, or at a second Ctrl-C,
the watcher says how to go on and ends the process on the spot. That is safe because every output
is written to survive a kill at any moment (the same command resumes it; leases end with their
process); DataLoader and dask worker processes end when their parent does.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Iterator

GRACE_S = 5.0
DEFAULT_HINT = "run the same command again to resume"
_hint: Callable[[], str] = lambda: DEFAULT_HINT  # noqa: E731


def set_interrupt_hint(hint: Callable[[], str]) -> None:
    """What to tell the user about going on (a stage's own advice, e.g. fit's --resume), for a
    command the watcher has to end without waiting for it."""
    global _hint
    _hint = hint


@contextlib.contextmanager
def prompt_interrupts(shown: Callable[[str], str] = str) -> Iterator[Callable[[], None]]:
    """Run a command under the rules above; yields `reported`, to call once the command has told
    the user it was interrupted (the watcher then ends the process without a second message).
    `shown` turns the hint into the words of the caller's user (the CLI's flags for parameters).
    Once interrupted, the process is ended at the deadline even after the block: what remains is
    the interpreter's own shutdown, which waits for threads of the libraries."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield lambda: None  # signals reach the main thread only; a process started ignoring SIGINT keeps to that
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous_handler = signal.signal(signal.SIGINT, _first_interrupt_only())
    reported = threading.Event()
    threading.Thread(target=_watch, args=(read_fd, reported, shown), name="revq-interrupts", daemon=True).start()
    try:
        yield reported.set
    finally:
        set_interrupt_hint(lambda: DEFAULT_HINT)  # a stage's advice was for this command only
        signal.signal(signal.SIGINT, previous_handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads the end of the pipe


def _first_interrupt_only() -> Callable:
    """A SIGINT handler raising KeyboardInterrupt the first time only: a second Ctrl-C must not
    break the clean-up the first one started (the watcher ends the process instead)."""
    raised = False

    def handler(signum, frame):
        nonlocal raised
        if not raised:
            raised = True
            raise KeyboardInterrupt

    return handler


def _watch(read_fd: int, reported: threading.Event, shown: Callable[[str], str]) -> None:
    """Read signal numbers from the wakeup pipe until it closes. After a SIGINT, end the process
    at the deadline, at a second SIGINT, or as soon as the command has unwound and said how to go
    on: the interpreter's own shutdown after that (freeing torch, joining library threads and
    processes) took seconds more, and everything worth keeping is already on disk."""
    deadline, interrupts = None, 0
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([pipe], [], [], wait)[0]:
                break  # the deadline passed
            data = pipe.read(64)
            if not data:  # the command ended
                if deadline is None:
                    return
                if not reported.is_set():
                    time.sleep(max(0.0, deadline - time.monotonic()))
                break
            interrupts += data.count(signal.SIGINT)
            if interrupts > 1:
                break
            if interrupts and deadline is None:
                deadline = time.monotonic() + GRACE_S
    if not reported.is_set():
        sys.stderr.write(f"\ninterrupted: stopped at once; {shown(_hint())}\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)
