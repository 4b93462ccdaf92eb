"""What holds around a `fit` run, whatever happens inside it: the run dir's lease (one job writes
a run dir at a time), deterministic algorithms on the CPU (pipeline/train/determinism.py), and after
Ctrl-C a hint that is true for this run dir (continue with --resume, or start again).

Under torchrun only rank 0 writes the run dir, so only rank 0 (RANK, as torchrun sets it) takes
the lease; the other ranks of the job would otherwise be refused as another job.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path

from revq_pipe.pipeline.train.checkpoint import CHECKPOINT_NAME
from revq_pipe.pipeline.train.determinism import deterministic_on_cpu
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.interrupts import set_interrupt_hint
from revq_pipe.pipeline.lease import output_lease


def guards_run_dir(fit):
    """Wrap `fit(store, out, *, device, resume, ...)` in the lease on `out`, CPU determinism and
    the Ctrl-C hint (a KeyboardInterrupt whose message the CLI prints)."""
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def guarded(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        out, device = arguments.arguments["out"], arguments.arguments["device"]
        lease = output_lease(out, "fit") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        set_interrupt_hint(lambda: _resume_hint(Path(out), arguments.arguments))  # for a fit stopped at once
        with lease, deterministic_on_cpu(resolve_device(device)):
            try:
                return fit(*args, **kwargs)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(_resume_hint(Path(out), arguments.arguments)) from None

    return guarded


def _resume_hint(run_dir: Path, arguments: dict) -> str:
    if not (run_dir / CHECKPOINT_NAME).is_file():
        return "no epoch had completed: run the same command again to start over"
    how = ("again" if arguments["resume"] else
           "with --resume instead of --overwrite" if arguments.get("overwrite") else "with --resume")
    return f"the last completed epoch's checkpoint is kept in {run_dir}: run the same command {how} to continue"
