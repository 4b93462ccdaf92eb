"""What holds around a `fit` run, whatever happens inside it: the run dir's lease (one job writes
a run dir at a time), deterministic algorithms on the CPU (pipeline/train/determinism.py), and after
Ctrl-C a hint that is true for this run dir (continue with --resume, or start again).

Under torchrun only rank 0 writes the run dir and takes the lease (checkpoint.writes_run_dir).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch

from revq_pipe.pipeline.interrupts import set_interrupt_hint
from revq_pipe.pipeline.lease import output_lease
from revq_pipe.pipeline.train.checkpoint import CHECKPOINT_NAME, writes_run_dir
from revq_pipe.pipeline.train.determinism import deterministic_on_cpu


@contextlib.contextmanager
def run_guard(out: str, device: torch.device, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """The lease on the run dir `out`, CPU determinism on `device`, and the Ctrl-C hint (a
    KeyboardInterrupt whose message the CLI prints) for a run started with `resume` / `overwrite`."""
    lease = output_lease(out, "fit") if writes_run_dir() else contextlib.nullcontext()
    hint = functools.partial(_resume_hint, Path(out), resume=resume, overwrite=overwrite)
    set_interrupt_hint(hint)  # for a fit stopped at once
    with lease, deterministic_on_cpu(device):
        try:
            yield
        except KeyboardInterrupt:
            raise KeyboardInterrupt(hint()) from None


def _resume_hint(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    if not (run_dir / CHECKPOINT_NAME).is_file():
        return "no epoch had completed: run the same command again to start over"
    how = "again" if resume else "with `resume=True` instead of `overwrite=True`" if overwrite else "with `resume=True`"
    return f"the last completed epoch's checkpoint is kept in {run_dir}: run the same command {how} to continue"
