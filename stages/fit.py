"""Stage two, `revq-pipe fit`: train the grouped quantizer and the rectifier from a latent store.

The recipe is the paper's released code: codebooks initialised from a random sample of the store's
tokens, codebook loss mse(tokens, quantized), rectifier loss mse(z, g(stopgrad(quantized))), AdamW
(codebooks lr 0.01 without weight decay; rectifier lr 0.01 x 0.05, weight decay 1e-4), gradient
clipping at 1.0 for each, exponential decay of both to 5% over the run, and the Non-Activation Reset
at each epoch end. Where revq-pipe departs from it by default, the paper's way stays a flag: the
rectifier is residual and the identity at initialisation (`rectifier_form="paper"` for the paper's),
and every random purpose has its own stream (seeds.py). `pipeline.train.trainer.Trainer` holds the model,
both optimizers and one step; `fit` is the loop around it: data, epochs, validation, checkpoints,
metrics.

The codebook loss is the quantizer's own latent MSE on the batch (tokens are a permutation of the
normalised latent), so it and the rectifier loss are directly comparable: the rectifier helps where
its loss is the lower one. Validation reports both on held-out latents each epoch.

Under torchrun, `fit` trains data-parallel (pipeline/train/distributed.py): `batch_size` stays the global
batch, each process steps on its share, and rank 0 alone writes the run dir and reports.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revq_pipe.pipeline.train.checkpoint import (check_resume, continued_train_config, load_checkpoint, save_checkpoint,
                                           start_over)
from revq_pipe.pipeline.train.codebook_init import init_codebooks
from revq_pipe.pipeline.model.config import (ReVQConfig, TrainConfig, check_codes_fit_data, resolve_model_config,
                                       resolve_train_config)
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.train.distributed import DataParallelGroup, in_process_group
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.fit_outputs import FitOutputs, epoch_line
from revq_pipe.pipeline.train.loader import LatentLoader, open_training_store
from revq_pipe.pipeline.paths import absolute_url
from revq_pipe.pipeline.reporting.console import progress_bar
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.train.run_guard import guards_run_dir
from revq_pipe.pipeline.seeds import stream_seed
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.train.trainer import NonFiniteTraining, Trainer
from revq_pipe.pipeline.images.vae import portable_vae_name

log = logging.getLogger(__name__)

class TrainingStopped(UserError):
    """Training met a non-finite value; the run dir keeps the last good checkpoint."""


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

    def report(self) -> str:
        last = self.history[-1] if self.history else {}
        m = self.model_config
        lines = [f"fit: {self.run_dir} ({m.name}, preset {m.preset}: T={m.tokens}, K={m.codes}, d={m.dim}, "
                 f"rectifier {m.rectifier}) - {self.epochs_done}/{self.train_config.epochs} epochs"
                 + (f", resumed at epoch {self.started_at_epoch + 1}" if self.started_at_epoch else "")
                 + f", {self.seconds:.1f} s"]
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


@in_process_group
@guards_run_dir
def fit(
    store: str,
    out: str,
    *,
    preset: str = "512T_NC=16384",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    val: str | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    split: str | None = None,
    rectifier: str | None = None,
    rectifier_form: str | None = None,
    rectifier_width: int | None = None,
    rectifier_layers: int | None = None,
    reset: bool = True,
    tokens: int | None = None,
    codes: int | None = None,
    codebook_update: str = "auto",
    codebook_init: str = "random",
    flip: bool | None = None,
    tensorboard: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train a ReVQ tokenizer on the latent store `store` into the run dir `out`.

    Writes `config.json` + `model.safetensors` + a model card (loadable with `ReVQ.from_pretrained(out)`),
    `checkpoint.pt`, `metrics.jsonl` and `metrics.png` (and TensorBoard events with `tensorboard`) after
    every epoch, and `training.json` (the training data and settings; pipeline/train/fit_outputs.py). With
    `resume`, continues from the last completed epoch and ends with the same weights as an
    uninterrupted run (on the CPU bit for bit at the same thread count: pipeline/train/determinism.py); with
    `epochs` beyond the run's, it extends the run (`TrainConfig.lr_at` says how the learning rate goes
    on). `overwrite` starts over in place.
    `flip` (default: when the store has them) trains on the flipped images' latents as well, one
    of the two per sample per epoch. `progress` shows bars and logs each epoch at INFO (without
    it, at DEBUG).
    """
    started = time.perf_counter()
    group = DataParallelGroup.current()
    progress = progress and group.is_writer
    dev = group.local_device(resolve_device(device))
    train_store, mean, std = open_training_store(store)
    data = {"url": absolute_url(train_store.url), "count": len(train_store), "revq": train_store.attrs}
    model_config = resolve_model_config(preset, train_store.latent_shape, tokens=tokens, codes=codes,
                                        split=split, rectifier=rectifier, rectifier_form=rectifier_form,
                                        rectifier_width=rectifier_width, rectifier_layers=rectifier_layers,
                                        vae=portable_vae_name(train_store.attrs.get("vae")),
                                        image_size=train_store.attrs.get("image_size"))
    if flip and not train_store.has_flip:
        raise UserError(f"{store} holds no flipped latents: encode it with --flip to train with them")
    train = resolve_train_config(preset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, reset=reset,
                                 codebook_update=codebook_update, codebook_init=codebook_init,
                                 flip=train_store.has_flip if flip is None else flip, device=dev)
    n = len(train_store)
    if train.batch_size > n:
        raise UserError(f"--batch-size {train.batch_size} is larger than the store ({n} latents)")
    check_codes_fit_data(model_config, n, store, from_preset=codes is None)
    group.require_divisible(train.batch_size)
    val_store = None
    if val is not None:
        val_store = LatentStore.open(val)
        if val_store.latent_shape != train_store.latent_shape:
            raise UserError(f"validation store {val} holds latents of shape {val_store.latent_shape}, "
                            f"the training store {train_store.latent_shape}")

    run_dir = Path(out)
    with group.together():  # every process reads the run dir before rank 0 writes to it
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {out} is a file, not a run directory")
        if resume and overwrite:
            raise UserError("--resume continues the run in --out, --overwrite starts it over: pass one of them")
        checkpoint = load_checkpoint(run_dir, dev) if resume else None
        if not (resume or overwrite) and ((run_dir / "checkpoint.pt").exists() or (run_dir / "config.json").exists()):
            raise UserError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start it "
                            f"over, or choose another --out")
        if checkpoint is not None:
            train = continued_train_config(checkpoint, train, epochs)
            check_resume(checkpoint, model_config, train, data, run_dir)
    group.require_same(checkpoint["epoch"] if checkpoint else None,
                       f"the checkpoint in {out} (it must lie on a file system every machine sees)")
    outputs = None  # rank 0 alone writes the run dir
    if group.is_writer:
        if overwrite:
            start_over(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs = FitOutputs(run_dir, {"data": data, "val": _store_record(val_store), "train": train.to_dict()},
                             tensorboard=tensorboard, resumed_at=checkpoint["epoch"] if checkpoint else 0)

    level = logging.INFO if progress else logging.DEBUG
    log.log(level, f"fit {store} -> {out} on {dev}\n  model: {json.dumps({**model_config.to_dict(), 'data': data['url']})}"
            f"\n  train: {json.dumps(train.to_dict())}")
    with torch.random.fork_rng(devices=[]):  # the rectifier's initial weights, without touching global state
        torch.manual_seed(stream_seed(train.seed, "rectifier_init"))
        model = ReVQ(model_config)
    model.preprocessor.set_stats(mean, std)
    model.to(dev).train()
    trainer = Trainer(model, train, group)
    loader = LatentLoader(train_store, train.batch_size, dev, seed=train.seed, flip=train.flip,
                          resident=checkpoint["resident"] if checkpoint else None, group=group)
    val_loader = (LatentLoader(val_store, max(train.batch_size, 256), dev, shuffle=False, drop_last=False, group=group)
                  if val_store is not None else None)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["trainer"])
        history, start_epoch = list(checkpoint["metrics"]), checkpoint["epoch"]
        # A crash between the checkpoint and the files written after it leaves those one epoch behind.
        if outputs is not None:
            outputs.epoch_done(model, history)
        log.log(level, f"  resuming after epoch {start_epoch}" + group.resumed_note(checkpoint.get("world_size", 1)))
        if train.epochs > train.lr_decay_epochs:
            log.log(level, f"  extended to {train.epochs} epochs: the learning rate decays over the first "
                           f"{train.lr_decay_epochs} as before, then stays at {train.lr_at(train.lr_decay_epochs):.3g}")
    else:
        kmeans = init_codebooks(model, loader, train)
        group.broadcast_(model.codebooks.data)  # k-means sums on a GPU may differ in the last bit
        if kmeans:
            log.log(level, f"  k-means init, {train.kmeans_iters} iterations: quantizer MSE on its sample "
                           f"{kmeans[0]:.4g} -> {kmeans[-1]:.4g}")
        history, start_epoch = [], 0
    log.log(level, f"  {n} latents{' and their flipped images' if train.flip else ''}, {len(loader)} steps per "
                   f"epoch, data {'on the device' if loader.resident else 'streamed'}"
                   + (f", {group.world_size} processes of {train.batch_size // group.world_size} latents a step"
                      if group.distributed else ""))

    for epoch in range(start_epoch, train.epochs):
        epoch_started = time.perf_counter()
        trainer.set_epoch(epoch)
        try:
            with progress_bar(progress, total=len(loader), desc=f"epoch {epoch + 1}/{train.epochs}",
                              leave=False, file=sys.stderr) as bar:
                for z in loader.epoch(epoch):
                    trainer.step(z)
                    _show_losses(bar, trainer, trainer.check())
                _show_losses(bar, trainer, trainer.check(last=True))
        except NonFiniteTraining as err:
            kept = (f"the checkpoint of epoch {len(history)} is kept in {out}" if history
                    else "no epoch had completed")
            raise TrainingStopped(f"training stopped at epoch {epoch + 1}, step {err.step + 1}: {err.reason}; "
                                  f"{kept} (try a lower --lr)") from None
        train_seconds = time.perf_counter() - epoch_started

        metrics = {"epoch": epoch + 1, "lr": train.lr_at(epoch), "lr_decay_epochs": train.lr_decay_epochs,
                   **trainer.end_epoch(epoch)}
        if val_loader is not None:
            metrics.update(trainer.validate(val_loader))
        metrics.update(epoch_seconds=time.perf_counter() - epoch_started,
                       samples_per_s=len(loader) * train.batch_size / max(train_seconds, 1e-9))
        history.append(metrics)

        if outputs is not None:
            save_checkpoint(run_dir, {"epoch": epoch + 1, "trainer": trainer.state_dict(),
                                      "model_config": model_config.to_dict(), "train_config": train.to_dict(),
                                      "data": data, "resident": loader.resident, "metrics": history,
                                      "world_size": group.world_size})
            outputs.epoch_done(model, history)
        log.log(level, epoch_line(metrics, train.epochs))
    if outputs is not None:
        outputs.close()

    return FitResult(run_dir, model_config, train, epochs_done=len(history), started_at_epoch=start_epoch,
                     history=history, seconds=time.perf_counter() - started, rank=group.rank)


def _show_losses(bar, trainer: Trainer, losses: list[float] | None) -> None:
    """Move the epoch's bar to the steps `trainer` has checked (its `check()` gave `losses`),
    showing their latest losses."""
    if losses is not None:
        bar.update(trainer.checked - bar.n)
        bar.set_postfix(codebook=f"{losses[0]:.4f}", rectifier=f"{losses[1]:.4f}")


def _store_record(store: LatentStore | None) -> dict[str, Any] | None:
    return None if store is None else {"url": absolute_url(store.url), "count": len(store)}
