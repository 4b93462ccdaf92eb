"""What `fit` writes into the run dir besides its checkpoint, after every epoch, and what it reports.

    config.json, model.safetensors, README.md   the model (ReVQ.save_pretrained; card with metrics)
    training.json                               where the data came from, how it trained (once)
    metrics.jsonl, metrics.png                  per-epoch numbers and their curves (see PLOT_EVERY_S)
    tensorboard/                                the same numbers as TensorBoard events (--tensorboard)

Every file is rewritten whole from the checkpoint's history, so after a crash between the
checkpoint and these files, the next `--resume` brings them level again.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.train.checkpoint import write_metrics
from revq_pipe.pipeline.train.config import TrainConfig
from revq_pipe.pipeline.reporting.metrics_plot import plot_metrics
from revq_pipe.pipeline.train.training_record import training_summary, write_training_record

PLOT_NAME = "metrics.png"
# metrics.png is redrawn after the last epoch, when training stops, and after any epoch that ends
# this long after the last drawing: a drawing takes about 0.3 CPU-s, which runs of short epochs
# (the demo, small stores) spent mostly on redrawing it; an epoch of real data takes far longer.
PLOT_EVERY_S = 30.0
TENSORBOARD_DIR = "tensorboard"


class FitOutputs:
    """The run dir's files other than the checkpoint; `epoch_done` after each epoch, `close` at the end."""

    def __init__(self, run_dir: Path, record: dict[str, Any], *, tensorboard: bool, resumed_at: int = 0):
        """`tensorboard` writes events; a resumed run that wrote them before goes on writing them."""
        self.run_dir = run_dir
        self.val_count = (record.get("val") or {}).get("count")  # the validation ceiling of metrics.png
        write_training_record(run_dir, record)
        events = run_dir / TENSORBOARD_DIR
        wrote_events = resumed_at > 0 and events.is_dir()
        self.events = _tensorboard_writer(events, resumed_at) if tensorboard or wrote_events else None
        self.plotted_at = time.monotonic()
        self.unplotted: dict[str, Any] | None = None  # plot_metrics' arguments for the epochs not drawn yet

    def epoch_done(self, model, history: list[dict[str, Any]], *, last: bool) -> None:
        """Write metrics.jsonl, metrics.png (see PLOT_EVERY_S; always with `last`), the TensorBoard
        scalars of the last epoch, and the model."""
        write_metrics(self.run_dir, history)
        self.unplotted = dict(history=list(history), path=self.run_dir / PLOT_NAME, val_count=self.val_count,
                              title=f"{self.run_dir.name}: {model.config.name}", codes=model.config.codes)
        if last or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            self._plot()
        if self.events is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.events.add_scalar(key, value, global_step=row["epoch"])
            self.events.flush()
        model.training_summary = training_summary(self.run_dir)
        model.save_pretrained(self.run_dir)

    def close(self, *, stopped: bool = False) -> None:
        """At the end of training: draw the epochs not drawn yet. When training was `stopped` by an
        error or Ctrl-C, a failing drawing is let go: what stopped it is the error to report."""
        with contextlib.suppress(Exception) if stopped else contextlib.nullcontext():
            self._plot()
        if self.events is not None:
            self.events.close()

    def _plot(self) -> None:
        if self.unplotted is not None:
            plot_metrics(**self.unplotted)
            self.unplotted, self.plotted_at = None, time.monotonic()


@dataclass
class FitResult:
    """What a `fit` run did: where it is, its configs, and the last epoch's metrics."""

    run_dir: Path
    model_config: ReVQConfig
    train_config: TrainConfig
    epochs_done: int
    started_at_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0  # this process's, under torchrun: only rank 0's result is worth reporting

    @property
    def finished_before(self) -> bool:
        """Whether the run had trained all its epochs before this call (a resume with nothing to do)."""
        return self.started_at_epoch >= self.train_config.epochs

    def report(self) -> str:
        """What the run is, how far it got, its last epoch's numbers and where its files are.
        Names parameters as a Python caller passes them (`epochs=N`); the CLI shows its flags."""
        last = self.history[-1] if self.history else {}
        m = self.model_config
        epochs = self.train_config.epochs
        if self.finished_before:
            progress = (f"finished already: {self.epochs_done}/{epochs} epochs, nothing to train (to train it "
                        f"further, pass `resume=True` with `epochs=N` above {epochs})")
        else:
            progress = (f"{self.epochs_done}/{epochs} epochs"
                        + (f", resumed at epoch {self.started_at_epoch + 1}" if self.started_at_epoch else "")
                        + f", {self.seconds:.1f} s")
        lines = [f"fit: {self.run_dir} ({m.name}, preset {m.preset}: T={m.tokens}, K={m.codes}, d={m.dim}, "
                 f"rectifier {m.rectifier}) - {progress}"]
        if last:
            lines.append(f"  last epoch: codebook loss {last['codebook_loss']:.4g}, rectifier loss "
                         f"{last['rectifier_loss']:.4g}, code usage {last['usage_mean_pct']:.1f}% "
                         f"(min {last['usage_min_pct']:.1f}%), perplexity {last['perplexity']:.1f}")
            if "val_mse" in last:
                lines.append(f"  validation latent MSE {last['val_mse']:.4g} (normalised), "
                             f"{last['val_mse_raw']:.4g} (raw); quantizer alone {last['val_mse_quantizer']:.4g} "
                             f"(normalised)")
        lines.append(f"  load it: ReVQ.from_pretrained({str(self.run_dir)!r}); metrics in {self.run_dir / 'metrics.jsonl'}"
                     f", curves in {self.run_dir / 'metrics.png'}")
        return "\n".join(lines)


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """The progress line of one epoch's metrics, saying so when the rectifier is worse than the
    quantizer alone (on validation when there is some, else on the training batches)."""
    line = (f"epoch {m['epoch']}/{epochs}: codebook {m['codebook_loss']:.4f}, rectifier {m['rectifier_loss']:.4f}, "
            f"usage {m['usage_mean_pct']:.1f}% (min {m['usage_min_pct']:.1f}%), reset {m['codes_reset']}")
    if "val_mse" in m:
        line += f", val MSE {m['val_mse']:.4f} (quantizer alone {m['val_mse_quantizer']:.4f})"
    line += f", {m['samples_per_s']:.0f} samples/s"
    worse = (m["val_mse"] > m["val_mse_quantizer"]) if "val_mse" in m else m["rectifier_loss"] > m["codebook_loss"]
    if worse:
        line += (" - the rectifier is worse than the quantizer alone " +
                 ("on validation" if "val_mse" in m else "on training batches"))
    return line


def _tensorboard_writer(log_dir: Path, resumed_at: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError("`tensorboard=True` needs the tensorboard package: pip install tensorboard") from err
    # On resume, drop the events a killed run wrote after its last checkpoint (steps are epochs).
    return SummaryWriter(str(log_dir), purge_step=resumed_at or None)
