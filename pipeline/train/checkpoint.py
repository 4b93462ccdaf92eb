"""The run dir's resumable checkpoint and metrics file, both written atomically (temp file + rename).

A crash at any moment leaves either the previous complete file or the new complete one, never a
half-written one: that is what lets `fit --resume` trust whatever it finds. `--resume --epochs N`
extends a run past the epochs it was started with; `--overwrite` starts it over in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from revq_pipe.pipeline.atomic_files import write_atomically
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.config import TrainConfig

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: the CLI's checks need the names alone
    import torch

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# What fit (and eval) write into a run dir, each also as NAME.tmp while being replaced: the
# checkpoint, the model (config.json, weights, model card), the training record, the metrics and
# their plot, TensorBoard's folder, and eval's result files (eval-<store>.json; eval.json before).
RUN_FILES = (CHECKPOINT_NAME, "config.json", "model.safetensors", "README.md", "training.json", METRICS_NAME,
             "metrics.png", "eval.json")
RUN_PATTERNS = ("eval-*.json", "eval-*.json.tmp")
RUN_FOLDERS = ("tensorboard",)


def writes_run_dir() -> bool:
    """Whether this process writes the run dir: under torchrun only rank 0 does (RANK, as torchrun
    sets it), so only rank 0 takes its lease; the other ranks would be refused as another job."""
    return os.environ.get("RANK", "0") == "0"


def launched_world_size() -> int:
    """How many processes torchrun started for this job (WORLD_SIZE, as torchrun sets it); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the training state (tensors, numbers, dicts) to RUN/checkpoint.pt atomically."""
    import torch

    write_atomically(run_dir / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint in RUN, or None when there is none yet."""
    import torch

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a foreign or damaged file: say which, do not guess
        raise UserError(f"{path} cannot be read as a revq-pipe checkpoint: {err}") from err


# Settings that say how a run began: a resumed run keeps its checkpoint's values unless the user
# sets them again (then they must agree, as every other setting must).
START_SETTINGS = ("lr_decay_epochs", "codebook_init", "kmeans_iters", "kmeans_budget")


def continued_train_config(checkpoint: dict[str, Any], train: TrainConfig, given: Mapping[str, Any]) -> TrainConfig:
    """The training config of a resumed run, from `train` (resolved from the user's settings, of which
    `given` are the ones set explicitly): the checkpoint's number of epochs, or `given["epochs"]`
    (more than the run had extends it), and the checkpoint's `START_SETTINGS` unless given, so a run
    keeps the learning-rate decay of its start (an extension's extra epochs train at the decay's end
    value: TrainConfig.lr_at) and the codebook initialisation it began with."""
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    total = given.get("epochs", saved.epochs)
    if total < checkpoint["epoch"]:
        raise UserError(f"`epochs={total}`: the run has already trained {checkpoint['epoch']} epochs")
    kept = {name: getattr(saved, name) for name in START_SETTINGS if name not in given}
    return dataclasses.replace(train, epochs=total, **kept)


def start_over(run_dir: Path) -> None:
    """Remove what an earlier fit (and eval) wrote in RUN, for `fit --overwrite`; other files stay."""
    for name in RUN_FILES:
        for path in (run_dir / name, run_dir / (name + ".tmp")):
            path.unlink(missing_ok=True)
    for pattern in RUN_PATTERNS:
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def check_resume(checkpoint: dict[str, Any], model_config: ReVQConfig, train: TrainConfig,
                 data: dict[str, Any], out: Path) -> None:
    """A resumed run must be the same run: same model, training (its length aside) and store;
    else say what differs."""
    saved = {**checkpoint["model_config"], "data": None}
    wanted = {**model_config.to_dict(), "data": None}
    saved_train = {**TrainConfig.from_dict(checkpoint["train_config"]).to_dict(), "epochs": train.epochs}
    for kind, old, new in (("model", saved, wanted), ("training", saved_train, train.to_dict()),
                           ("store", {k: checkpoint["data"][k] for k in ("count", "revq")},
                            {k: data[k] for k in ("count", "revq")})):
        diff = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        if diff:
            shown = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in diff)
            raise UserError(f"`resume=True` with a different {kind} config than {out} was started with ({shown})")


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite RUN/metrics.jsonl (one JSON object per completed epoch) from the checkpoint's history,
    so the file always matches the checkpoint, also after a crash between the two writes."""
    write_atomically(run_dir / METRICS_NAME,
                     lambda tmp: tmp.write_text("".join(json.dumps(line) + "\n" for line in history)))
