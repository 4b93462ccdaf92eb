"""Stage two, `revq-pipe fit`: train the grouped quantizer and the rectifier from a latent store.

The recipe is the paper's released code: codebooks initialised from a random sample of the store's
tokens, codebook loss mse(tokens, quantized), rectifier loss mse(z, g(stopgrad(quantized))), AdamW
(codebooks lr 0.01 without weight decay; rectifier lr 0.01 x 0.05, weight decay 1e-4), gradient
clipping at 1.0 for each, exponential decay of both to 5% over the run, and the Non-Activation Reset
at each epoch end. Where revq-pipe departs from it by default, the paper's way stays a flag: the
rectifier is residual and the identity at initialisation (`rectifier_form="paper"` for the paper's),
the codebooks start from k-means (`codebook_init="random"` for the paper's samples alone), and every
random purpose has its own stream (seeds.py). `pipeline.train.trainer.Trainer` holds the model,
both optimizers and one step. `fit` takes a `FitConfig` (a preset and overrides,
pipeline/train/config.py); `prepare_fit` resolves it against the store and checks everything that
can be checked before training (stores, resume, processes), builds the model, its trainer and its
data, and starts or resumes the codebooks: a `FitPlan`. `train_epochs` is the loop around it:
epochs, steps, end of epoch, validation, checkpoint, metrics.

The codebook loss is the quantizer's own latent MSE on the batch (tokens are a permutation of the
normalised latent), so it and the rectifier loss are directly comparable: the rectifier helps where
its loss is the lower one. Validation reports both on held-out latents each epoch.

Under torchrun, `fit` trains data-parallel (pipeline/train/distributed.py): `batch_size` stays the global
batch, each process steps on its share, and rank 0 alone writes the run dir and reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.vae import portable_vae_name
from revq_pipe.pipeline.model.config import ReVQConfig
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.preflight import check_fit, run_output
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.seeds import stream_seed
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.train.checkpoint import (check_resume, continued_train_config, load_checkpoint,
                                                 save_checkpoint, start_over)
from revq_pipe.pipeline.train.codebook_init import init_codebooks
from revq_pipe.pipeline.train.config import FitConfig, TrainConfig
from revq_pipe.pipeline.train.distributed import DataParallelGroup, in_process_group
from revq_pipe.pipeline.train.fit_outputs import FitOutputs, FitResult, epoch_line
from revq_pipe.pipeline.train.loader import LatentLoader, open_training_store
from revq_pipe.pipeline.train.run_guard import run_guard
from revq_pipe.pipeline.train.trainer import NonFiniteTraining, Trainer

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """Training met a non-finite value; the run dir keeps the last good checkpoint."""


@dataclass
class FitPlan:
    """Everything the epochs need, checked and built by `prepare_fit`; `history` holds the epochs
    done (a resumed run's from its checkpoint), and training goes on at `start_epoch`."""

    run_dir: Path
    model: ReVQ
    train: TrainConfig
    trainer: Trainer
    loader: LatentLoader
    val_loader: LatentLoader | None
    group: DataParallelGroup
    outputs: FitOutputs | None  # rank 0 alone writes the run dir
    data: dict[str, Any]  # the training store's record: URL, count, attrs
    progress: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def level(self) -> int:
        """Progress lines log at INFO with `progress`, else at DEBUG."""
        return logging.INFO if self.progress else logging.DEBUG

    def epoch_bar(self, epoch: int):
        """The progress bar of one epoch's steps (hidden without `progress`)."""
        return progress_bar(self.progress, total=len(self.loader), desc=f"epoch {epoch + 1}/{self.train.epochs}",
                            leave=False, file=sys.stderr)

    def epoch_done(self) -> None:
        """The checkpoint of the last epoch in `history`, then the run dir's other files (rank 0)."""
        if self.outputs is None:
            return
        save_checkpoint(self.run_dir, {
            "epoch": len(self.history), "trainer": self.trainer.state_dict(),
            "model_config": self.model.config.to_dict(), "train_config": self.train.to_dict(), "data": self.data,
            "resident": self.loader.resident, "metrics": self.history, "world_size": self.group.world_size})
        self.outputs.epoch_done(self.model, self.history, last=len(self.history) == self.train.epochs)

    @contextlib.contextmanager
    def stops_on_non_finite(self, epoch: int) -> Iterator[None]:
        """Turn a non-finite value met in `epoch` into `TrainingStopped`, naming the epoch, the step and
        the checkpoint kept."""
        try:
            yield
        except NonFiniteTraining as err:
            kept = (f"the checkpoint of epoch {len(self.history)} is kept in {self.run_dir}" if self.history
                    else "no epoch had completed")
            raise TrainingStopped(f"training stopped at epoch {epoch + 1}, step {err.step + 1}: {err.reason}; "
                                  f"{kept} (try a lower `lr`)") from None


@in_process_group
def fit(store: str, out: str, config: FitConfig | None = None, *, val: str | None = None, resume: bool = False,
        overwrite: bool = False, tensorboard: bool = False, progress: bool = True) -> FitResult:
    """Train a ReVQ tokenizer on the latent store `store` into the run dir `out`, as `config` says
    (default: `FitConfig()`, the auto preset).

    Writes `config.json` + `model.safetensors` + a model card (loadable with `ReVQ.from_pretrained(out)`),
    `checkpoint.pt`, `metrics.jsonl` (and TensorBoard events with `tensorboard`) after every epoch,
    `metrics.png` after the last and every 30 s or so, and `training.json` (the training data and
    settings; pipeline/train/fit_outputs.py).
    `val` names a latent store for validation MSE each epoch. With `resume`, continues from the last
    completed epoch and ends with the same weights as an uninterrupted run (on the CPU bit for bit at
    the same thread count: pipeline/train/determinism.py); with `epochs` beyond the run's, it extends
    the run (`TrainConfig.lr_at` says how the learning rate goes on). `overwrite` starts over in place.
    `progress` shows bars and logs each epoch at INFO (without it, at DEBUG).
    """
    started = time.perf_counter()
    config = config or FitConfig()
    check_fit(store, out, config, val=val, resume=resume, overwrite=overwrite)
    group = DataParallelGroup.current()
    device = group.local_device(resolve_device(config.device))
    with run_guard(out, device, resume=resume, overwrite=overwrite):
        plan = prepare_fit(store, out, config, device, val=val, resume=resume, overwrite=overwrite,
                           tensorboard=tensorboard, progress=progress and group.is_writer)
        train_epochs(plan)
    return FitResult(plan.run_dir, plan.model.config, plan.train, epochs_done=len(plan.history),
                     started_at_epoch=plan.start_epoch, history=plan.history, seconds=time.perf_counter() - started,
                     rank=group.rank)


def train_epochs(plan: FitPlan) -> None:
    """The training loop: from `plan.start_epoch` to the last epoch, the steps of each epoch, its end
    (Non-Activation Reset, usage), validation, the checkpoint and metrics."""
    trainer, loader, train = plan.trainer, plan.loader, plan.train
    try:
        for epoch in range(plan.start_epoch, train.epochs):
            epoch_started = time.perf_counter()
            trainer.set_epoch(epoch)
            with plan.stops_on_non_finite(epoch), plan.epoch_bar(epoch) as bar:
                for z in loader.epoch(epoch):
                    trainer.step(z)
                    _show_losses(bar, trainer, trainer.check())
                _show_losses(bar, trainer, trainer.check(last=True))
            train_seconds = time.perf_counter() - epoch_started

            metrics = {"epoch": epoch + 1, "lr": train.lr_at(epoch), "lr_decay_epochs": train.lr_decay_epochs,
                       **trainer.end_epoch(epoch)}
            if plan.val_loader is not None:
                metrics.update(trainer.validate(plan.val_loader))
            metrics.update(epoch_seconds=time.perf_counter() - epoch_started,
                           samples_per_s=len(loader) * train.batch_size / max(train_seconds, 1e-9))
            plan.history.append(metrics)
            plan.epoch_done()
            log.log(plan.level, epoch_line(metrics, train.epochs))
    finally:  # finished or stopped, the run dir's other files catch up with its checkpoint
        if plan.outputs is not None:
            plan.outputs.close(stopped=sys.exc_info()[0] is not None)


def prepare_fit(store: str, out: str, config: FitConfig, device: torch.device, *, val: str | None, resume: bool,
                overwrite: bool, tensorboard: bool, progress: bool) -> FitPlan:
    """Everything before the first step: resolve `config` against the store and `device`, open the
    validation store, apply the resume policy (every process agreeing), build the model, its trainer
    and loaders, and start the codebooks (or load the checkpoint's state)."""
    group = DataParallelGroup.current()
    level = logging.INFO if progress else logging.DEBUG
    train_store, mean, std = open_training_store(store)
    resolved = config.resolve(len(train_store), train_store.latent_shape, device=device,
                              has_flip=train_store.has_flip, vae=portable_vae_name(train_store.attrs.get("vae")),
                              image_size=train_store.attrs.get("image_size"), store=store)
    if resolved.note:
        log.log(level, resolved.note)
    group.require_divisible(resolved.train.batch_size)
    val_store = _validation_store(val, train_store)
    data = {"url": absolute_url(train_store.url), "count": len(train_store), "revq": train_store.attrs}
    run_dir = Path(out)
    checkpoint, train = _resume_policy(run_dir, resolved.model, resolved.train, config, data, device, group,
                                       resume=resume, overwrite=overwrite)
    if val is None and (checkpoint or {}).get("epoch", 0) < train.epochs:
        log.log(level, "no validation MSE will be reported: pass `val=STORE`, a latent store of images kept out "
                       "of training, to measure it after every epoch")
    outputs = None  # rank 0 alone writes the run dir
    if group.is_writer:
        if overwrite:
            start_over(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"data": data, "val": _store_record(val_store), "fit_config": config.to_dict(),
                  "train": train.to_dict()}
        outputs = FitOutputs(run_dir, record, tensorboard=tensorboard,
                             resumed_at=checkpoint["epoch"] if checkpoint else 0)
    model_line = json.dumps({**resolved.model.to_dict(), "data": data["url"]})
    log.log(level, f"fit {store} -> {out} on {device}\n  model: {model_line}\n  train: {json.dumps(train.to_dict())}")
    model = _build_model(resolved.model, train.seed, mean, std, device)
    loader = LatentLoader(train_store, train.batch_size, device, seed=train.seed, flip=train.flip,
                          resident=checkpoint["resident"] if checkpoint else None, group=group)
    val_loader = (None if val_store is None else LatentLoader(val_store, max(train.batch_size, 256), device,
                                                              shuffle=False, drop_last=False, group=group))
    plan = FitPlan(run_dir, model, train, Trainer(model, train, group), loader, val_loader, group, outputs, data,
                   progress)
    _start_or_resume(plan, checkpoint)
    log.log(level, f"  {len(train_store)} latents{' and their flipped images' if train.flip else ''}, {len(loader)} "
                   f"steps per epoch, data {'on the device' if loader.resident else 'streamed'}"
                   + (f", {group.world_size} processes of {train.batch_size // group.world_size} latents a step"
                      if group.distributed else ""))
    return plan


def _validation_store(val: str | None, train_store: LatentStore) -> LatentStore | None:
    if val is None:
        return None
    val_store = LatentStore.open(val)
    if val_store.latent_shape != train_store.latent_shape:
        raise UserError(f"validation store {val} holds latents of shape {val_store.latent_shape}, "
                        f"the training store {train_store.latent_shape}")
    return val_store


def _resume_policy(run_dir: Path, model_config: ReVQConfig, train: TrainConfig, config: FitConfig,
                   data: dict[str, Any], device: torch.device, group: DataParallelGroup, *, resume: bool,
                   overwrite: bool) -> tuple[dict[str, Any] | None, TrainConfig]:
    """The checkpoint to resume from (None for a new run) and the training config to go on with;
    refuses a run dir that is a file, `resume` with `overwrite`, an existing run without either, and
    a resume with other settings than the run's. Every process decides alike (`group.together`)."""
    with group.together():  # every process reads the run dir before rank 0 writes to it
        run_output(run_dir, resume=resume, overwrite=overwrite)  # again, now that this job holds the run dir
        checkpoint = load_checkpoint(run_dir, device) if resume else None
        if checkpoint is not None:
            train = continued_train_config(checkpoint, train, config.overrides)
            check_resume(checkpoint, model_config, train, data, run_dir)
    group.require_same(checkpoint["epoch"] if checkpoint else None,
                       f"the checkpoint in {run_dir} (it must lie on a file system every machine sees)")
    return checkpoint, train


def _build_model(config: ReVQConfig, seed: int, mean, std, device: torch.device) -> ReVQ:
    with torch.random.fork_rng(devices=[]):  # the rectifier's initial weights, without touching global state
        torch.manual_seed(stream_seed(seed, "rectifier_init"))
        model = ReVQ(config)
    model.preprocessor.set_stats(mean, std)
    return model.to(device).train()


def _start_or_resume(plan: FitPlan, checkpoint: dict[str, Any] | None) -> None:
    """A new run's initial codebooks (the same on every process), or a resumed run's trainer state,
    history and next epoch."""
    if checkpoint is None:
        line = init_codebooks(plan.model, plan.loader, plan.train, progress=plan.progress)
        plan.group.broadcast_(plan.model.codebooks.data)  # k-means sums on a GPU may differ in the last bit
        if line:
            log.log(plan.level, f"  {line}")
        return
    plan.trainer.load_state_dict(checkpoint["trainer"])
    plan.history, plan.start_epoch = list(checkpoint["metrics"]), checkpoint["epoch"]
    # A crash between the checkpoint and the files written after it leaves those one epoch behind.
    if plan.outputs is not None:
        plan.outputs.epoch_done(plan.model, plan.history, last=False)  # drawn by the loop or at its end
    train = plan.train
    if plan.start_epoch >= train.epochs:
        return  # finished: nothing to train (the result says so, and how to train it further)
    log.log(plan.level, f"  resuming after epoch {plan.start_epoch}"
            + plan.group.resumed_note(checkpoint.get("world_size", 1)))
    if train.epochs > train.lr_decay_epochs:
        final = train.lr_at(train.lr_decay_epochs)
        log.log(plan.level, f"  extended to {train.epochs} epochs: the learning rate decays over the first "
                            f"{train.lr_decay_epochs} as before, then stays at {final:.3g}")


def _show_losses(bar, trainer: Trainer, losses: list[float] | None) -> None:
    """Move the epoch's bar to the steps `trainer` has checked (its `check()` gave `losses`),
    showing their latest losses."""
    if losses is not None:
        bar.update(trainer.checked - bar.n)
        bar.set_postfix(codebook=f"{losses[0]:.4f}", rectifier=f"{losses[1]:.4f}")


def _store_record(store: LatentStore | None) -> dict[str, Any] | None:
    return None if store is None else {"url": absolute_url(store.url), "count": len(store)}
