"""How revq-pipe talks to a person: log records on stderr, progress bars beside them, plain tables.

Every module logs to `logging.getLogger(__name__)`, below the `revq_pipe` logger. Only the CLI
calls `console_reporting`: one handler on `revq_pipe` writes each record to stderr as its bare
message (as Python's last-resort handler printed warnings before), INFO and above, and while a
command runs the records go through `tqdm.write`, so a line never lands inside a progress bar.
A library user who sets up nothing sees warnings only, from Python's last-resort handler.

Why not rich's RichHandler: it lays every record out at the console's width (80 columns when
stderr is a file or a pipe), wrapping long messages and padding lines with spaces, and tqdm's
redirect only swaps plain stream handlers, so a RichHandler would print each record twice there.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager
from io import StringIO
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table
from tqdm.contrib.logging import logging_redirect_tqdm

LOGGER_NAME = "revq_pipe"
# Tables are rendered at this width whatever the terminal: the same text on screen, in files and in tests.
TABLE_WIDTH = 100


class StderrHandler(logging.StreamHandler):
    """A stream handler on whatever `sys.stderr` is when a record arrives (test runners and
    notebooks replace it), as Python's own last-resort handler does."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would fix the stream now
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Give the `revq_pipe` logger its one stderr handler (calling it again adds none) and `level`."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        logger.addHandler(StderrHandler())
    logger.setLevel(level)
    return logger


@contextmanager
def console_reporting() -> Iterator[None]:
    """Set up logging, and for the duration write its records through `tqdm.write` (which lifts
    the bars off the terminal, prints the line and draws them again)."""
    with logging_redirect_tqdm(loggers=[setup_logging()]):
        yield


def table_text(table: Table) -> str:
    """A rich table as plain text: no colour codes, `TABLE_WIDTH` columns, no trailing newline."""
    buffer = StringIO()
    Console(file=buffer, width=TABLE_WIDTH, color_system=None).print(table)
    return buffer.getvalue().rstrip()


def human_bytes(n: float) -> str:
    """A byte count in words: 512 B, 110.9 KB, 4.2 GB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"


def progress_bar(show: bool, **options: Any):
    """A tqdm bar to stderr, hidden when `show` is false. Only a hidden bar passes `disable`, so a
    shown one still obeys the user's TQDM_DISABLE=1 (tqdm reads it only for arguments not given).
    A bar with a total never counts past it: work redone after a resume or a lost dask worker
    (a block re-read, a piece staged again) would otherwise show as more images than there are."""
    return _bounded_bar()(**options, **({} if show else {"disable": True}))


@functools.cache
def _bounded_bar():
    """tqdm's bar for this environment (imported when a bar is first made), updates capped at its total."""
    from tqdm.auto import tqdm

    class BoundedBar(tqdm):
        def update(self, n: float = 1):
            if self.total is not None:
                n = max(0, min(n, self.total - self.n))
            return super().update(n)

    return BoundedBar
