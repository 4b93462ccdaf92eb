"""Stage two, `revq-pipe fit`: train the grouped quantizer and the rectifier from a latent store.

The recipe is the paper's released code: codebooks initialised from a random sample of the store's
tokens, codebook loss mse(tokens, quantized), rectifier loss mse(z, g(stopgrad(quantized))), AdamW
(codebooks lr 0.01 without weight decay; rectifier lr 0.01 x 0.05, weight decay 1e-4), gradient
clipping at 1.0 for each, exponential decay of both to 5% over the run, and the Non-Activation Reset
at each epoch end. Where revq-pipe departs from it by default, the paper's way stays a flag: the
rectifier is residual and the identity at initialisation (`rectifier_form="paper"` for the paper's),
and every random purpose has its own stream (seeds.py). `Trainer` holds the model, both optimizers
and one step; `fit` is the loop around it: data, epochs, validation, checkpoints, metrics.

The codebook loss is the quantizer's own latent MSE on the batch (tokens are a permutation of the
normalised latent), so it and the rectifier loss are directly comparable: the rectifier helps where
its loss is the lower one. Validation reports both on held-out latents each epoch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from revq_pipe.pipeline.checkpoint import load_checkpoint, save_checkpoint, write_metrics
from revq_pipe.pipeline.codebook_init import kmeans_sample_size, lloyd_, sample_rows
from revq_pipe.pipeline.codebook_optim import SparseAdamW
from revq_pipe.pipeline.config import (ReVQConfig, TrainConfig, resolve_model_config, resolve_train_config,
                                       use_compile)
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.loader import LatentLoader
from revq_pipe.pipeline.revq import ReVQ, latent_metrics, usage_stats
from revq_pipe.pipeline.seeds import stream_generator, stream_seed
from revq_pipe.pipeline.store import LatentStore, absolute_url

# On CUDA, losses are read back to the host (one device sync) every this many steps, for the
# progress bar and the non-finite check; in between the GPU runs ahead. On the CPU, every step.
SYNC_EVERY_CUDA = 25


class TrainingStopped(UserError):
    """Training met a non-finite value; the run dir keeps the last good checkpoint."""


class Trainer:
    """The model, its two optimizers and one training step; its state is what a checkpoint holds."""

    def __init__(self, model: ReVQ, train: TrainConfig):
        self.model, self.train = model, train
        device = model.device
        self.cuda = device.type == "cuda"
        codebooks = model.codebooks
        if train.codebook_update == "sparse":
            self.codebook_opt = SparseAdamW(codebooks, lr=train.lr, max_grad_norm=train.grad_clip)
        else:
            self.codebook_opt = torch.optim.AdamW([codebooks], lr=train.lr, weight_decay=0.0,
                                                  fused=True if self.cuda else None)
        self.rectifier_params = list(model.rectifier.parameters())
        self.rectifier_opt = (
            torch.optim.AdamW(self.rectifier_params, lr=train.lr * train.rectifier_lr_scale,
                              weight_decay=train.rectifier_weight_decay, fused=True if self.cuda else None)
            if self.rectifier_params else None
        )
        # Bf16 autocast and compilation pay off on the GPU only (DESIGN.md: the rectifier is bound by
        # memory traffic of small ops); the CPU path stays eager fp32 and bit-reproducible.
        self.rectify = model.rectifier
        if use_compile(device) and self.rectifier_params:
            self.rectify = torch.compile(model.rectifier)
        self.counts = torch.zeros(model.config.tokens, model.config.codes, dtype=torch.int32, device=device)

    def set_epoch(self, epoch: int) -> None:
        """Learning rates of an epoch (exponential decay to `final_lr_fraction` over the run)."""
        lr = self.train.lr_at(epoch)
        if isinstance(self.codebook_opt, SparseAdamW):
            self.codebook_opt.lr = lr
        else:
            self.codebook_opt.param_groups[0]["lr"] = lr
        if self.rectifier_opt is not None:
            self.rectifier_opt.param_groups[0]["lr"] = lr * self.train.rectifier_lr_scale
        self.counts.zero_()

    def step(self, z: torch.Tensor) -> torch.Tensor:
        """One step on a batch of raw latents; returns [codebook loss, rectifier loss] (no host sync)."""
        model, clip = self.model, self.train.grad_clip
        zn = model.preprocessor.normalize(z)
        tokens = model.splitter.split(zn)
        # On CUDA the search's NaN/inf check would sync every step; the loss check every
        # SYNC_EVERY_CUDA steps catches non-finite values instead.
        ids = model.quantizer.search(tokens, self.counts, check_finite=not self.cuda)
        if isinstance(self.codebook_opt, SparseAdamW):
            with torch.no_grad():
                quantized = model.quantizer.lookup(ids)
                codebook_loss = F.mse_loss(quantized, tokens)
                # d mse / d quantized, in closed form: the optimizer needs no autograd graph.
                self.codebook_opt.step(ids, (quantized - tokens) * (2.0 / tokens.numel()))
        else:
            quantized = model.quantizer.lookup(ids)
            codebook_loss = F.mse_loss(quantized, tokens)
            codebook_loss.backward()
            torch.nn.utils.clip_grad_norm_([model.codebooks], clip)
            self.codebook_opt.step()
            self.codebook_opt.zero_grad(set_to_none=True)
            quantized = quantized.detach()

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            rectified = self.rectify(model.splitter.merge(quantized))
        rectifier_loss = F.mse_loss(rectified.float(), zn)
        if self.rectifier_opt is not None:
            rectifier_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.rectifier_params, clip)
            self.rectifier_opt.step()
            self.rectifier_opt.zero_grad(set_to_none=True)
        return torch.stack([codebook_loss.detach(), rectifier_loss.detach()])

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Usage of this epoch's codes, then the Non-Activation Reset (when enabled)."""
        if isinstance(self.codebook_opt, SparseAdamW):
            self.codebook_opt.flush()  # codebooks and moments as dense AdamW has them now
        stats = usage_stats(self.counts)
        moved = 0
        if self.train.reset:
            generator = stream_generator(self.train.seed, "reset_noise", epoch, device=self.model.device)
            positions, codes = self.model.quantizer.reset_unused(
                self.counts, ratio=self.train.reset_ratio, noise=self.train.reset_noise, generator=generator)
            moved = len(codes)
            self._forget(positions, codes)
        return {**stats, "codes_reset": moved}

    def _forget(self, positions: torch.Tensor, codes: torch.Tensor) -> None:
        # Moments of a moved code describe its old place; dense AdamW's would have decayed to ~0
        # over an epoch without gradient anyway.
        if isinstance(self.codebook_opt, SparseAdamW):
            self.codebook_opt.forget(positions, codes)
        elif self.codebook_opt.state:
            state = self.codebook_opt.state[self.model.codebooks]
            state["exp_avg"][positions, codes] = 0
            state["exp_avg_sq"][positions, codes] = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "codebook_opt": self.codebook_opt.state_dict(),
            "rectifier_opt": self.rectifier_opt.state_dict() if self.rectifier_opt else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.codebook_opt.load_state_dict(state["codebook_opt"])
        if self.rectifier_opt is not None:
            self.rectifier_opt.load_state_dict(state["rectifier_opt"])


@torch.inference_mode()
def validate(model: ReVQ, loader: LatentLoader) -> dict[str, float]:
    """Latent MSE on a store (normalised and raw) of quantize-then-rectify and of the quantizer alone,
    and its code usage."""
    model.eval()
    metrics = latent_metrics(model, loader.epoch())
    model.train()
    return {"val_mse": metrics["latent_mse_normalised"], "val_mse_raw": metrics["latent_mse"],
            "val_mse_quantizer": metrics["quantizer_mse_normalised"], "val_mse_quantizer_raw": metrics["quantizer_mse"],
            "val_usage_mean_pct": metrics["usage_mean_pct"], "val_perplexity": metrics["perplexity"]}


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

    def report(self) -> str:
        last = self.history[-1] if self.history else {}
        m = self.model_config
        lines = [f"fit: {self.run_dir} ({m.preset}: T={m.tokens}, K={m.codes}, d={m.dim}, "
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
        lines.append(f"  load it: ReVQ.from_pretrained({str(self.run_dir)!r}); metrics in {self.run_dir / 'metrics.jsonl'}")
        return "\n".join(lines)


def _store_description(store: LatentStore) -> dict[str, Any]:
    url = absolute_url(store.url)
    return {"url": url, "count": len(store), "revq": store.attrs}


def _open_training_store(url: str) -> tuple[LatentStore, np.ndarray, np.ndarray]:
    store = LatentStore.open(url)
    mean, std = store.require_stats()
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise UserError(f"{url} has non-finite mean/std: the store holds NaN or inf latents")
    if len(store) == 0:
        raise UserError(f"{url} holds no latents")
    return store, mean, std


def _init_codebooks(model: ReVQ, loader: LatentLoader, train: TrainConfig, say) -> None:
    """Code k of every position starts as the token of the k-th of K distinct random samples; with
    `codebook_init="kmeans"`, Lloyd iterations on a larger sample (starting there) refine them."""
    k = model.config.codes
    size = kmeans_sample_size(loader.n, k) if train.codebook_init == "kmeans" else k
    rows = sample_rows(loader.n, size, train.seed)
    with torch.no_grad():
        tokens = model.splitter.split(model.preprocessor.normalize(loader.rows(rows)))  # (S, T, d)
    model.quantizer.init_from_tokens(tokens[:k])
    if train.codebook_init == "kmeans":
        history = lloyd_(model.codebooks.data, tokens.transpose(0, 1).contiguous(), train.kmeans_iters)
        say(f"  k-means init on {size} latents, {train.kmeans_iters} iterations: quantizer MSE on the sample "
            f"{history[0]:.4g} -> {history[-1]:.4g}")


def _check_resume(checkpoint: dict[str, Any], model_config: ReVQConfig, train: TrainConfig,
                  data: dict[str, Any], out: Path) -> None:
    """A resumed run must be the same run: same model, training and store; else say what differs."""
    saved = {**checkpoint["model_config"], "data": None}
    wanted = {**model_config.to_dict(), "data": None}
    for kind, old, new in (("model", saved, wanted), ("training", checkpoint["train_config"], train.to_dict()),
                           ("store", {k: checkpoint["data"][k] for k in ("count", "revq")},
                            {k: data[k] for k in ("count", "revq")})):
        diff = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        if diff:
            shown = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in diff)
            raise UserError(f"--resume with a different {kind} config than {out} was started with ({shown})")


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
    progress: bool = True,
) -> FitResult:
    """Train a ReVQ tokenizer on the latent store `store` into the run dir `out`.

    Writes `config.json` + `model.safetensors` (loadable with `ReVQ.from_pretrained(out)`),
    `checkpoint.pt` and `metrics.jsonl` after every epoch. With `resume`, continues from the last
    completed epoch and ends with the same weights as an uninterrupted run (on the CPU bit for bit).
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    train_store, mean, std = _open_training_store(store)
    data = _store_description(train_store)
    model_config = resolve_model_config(preset, train_store.latent_shape, tokens=tokens, codes=codes,
                                        split=split, rectifier=rectifier, rectifier_form=rectifier_form,
                                        rectifier_width=rectifier_width, rectifier_layers=rectifier_layers, data=data)
    train = resolve_train_config(preset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, reset=reset,
                                 codebook_update=codebook_update, codebook_init=codebook_init, device=dev)
    n = len(train_store)
    if model_config.codes > n:
        raise UserError(f"K={model_config.codes} codes per position need at least {model_config.codes} latents "
                        f"for the initial sample, but {store} holds {n}: pass --codes {n} or fewer")
    if train.batch_size > n:
        raise UserError(f"--batch-size {train.batch_size} is larger than the store ({n} latents)")
    val_store = None
    if val is not None:
        val_store = LatentStore.open(val)
        if val_store.latent_shape != train_store.latent_shape:
            raise UserError(f"validation store {val} holds latents of shape {val_store.latent_shape}, "
                            f"the training store {train_store.latent_shape}")

    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory")
    checkpoint = load_checkpoint(run_dir, dev) if resume else None
    if not resume and ((run_dir / "checkpoint.pt").exists() or (run_dir / "config.json").exists()):
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if checkpoint is not None:
        _check_resume(checkpoint, model_config, train, data, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    say(f"fit {store} -> {out} on {dev}\n  model: {json.dumps({**model_config.to_dict(), 'data': data['url']})}"
        f"\n  train: {json.dumps(train.to_dict())}")

    with torch.random.fork_rng(devices=[]):  # the rectifier's initial weights, without touching global state
        torch.manual_seed(stream_seed(train.seed, "rectifier_init"))
        model = ReVQ(model_config)
    model.preprocessor.set_stats(mean, std)
    model.to(dev).train()
    trainer = Trainer(model, train)
    loader = LatentLoader(train_store, train.batch_size, dev, seed=train.seed,
                          resident=checkpoint["resident"] if checkpoint else None)
    val_loader = (LatentLoader(val_store, max(train.batch_size, 256), dev, shuffle=False, drop_last=False)
                  if val_store is not None else None)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["trainer"])
        history, start_epoch = list(checkpoint["metrics"]), checkpoint["epoch"]
        # A crash between the checkpoint and the files written after it leaves those one epoch behind.
        write_metrics(run_dir, history)
        model.save_pretrained(run_dir, train=train.to_dict())
        say(f"  resuming after epoch {start_epoch}")
    else:
        _init_codebooks(model, loader, train, say)
        history, start_epoch = [], 0
    say(f"  {n} latents, {len(loader)} steps per epoch, data {'on the device' if loader.resident else 'streamed'}")

    sync_every = SYNC_EVERY_CUDA if dev.type == "cuda" else 1
    for epoch in range(start_epoch, train.epochs):
        epoch_started = time.perf_counter()
        trainer.set_epoch(epoch)
        losses = torch.zeros(len(loader), 2, device=dev)
        checked = 0
        with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{train.epochs}", disable=not progress,
                  leave=False, file=sys.stderr) as bar:
            for step, z in enumerate(loader.epoch(epoch)):
                try:
                    losses[step] = trainer.step(z)
                except ValueError as err:
                    if "NaN or inf" not in str(err):  # the search refuses non-finite inputs or codebooks
                        raise
                    raise TrainingStopped(_stop_message(epoch, step, str(err), len(history), out)) from None
                if step + 1 - checked >= sync_every or step + 1 == len(loader):
                    _check_finite(losses, checked, step + 1, epoch, len(history), out)
                    checked = step + 1
                    bar.update(step + 1 - bar.n)
                    bar.set_postfix(codebook=f"{losses[step, 0].item():.4f}",
                                    rectifier=f"{losses[step, 1].item():.4f}")
        train_seconds = time.perf_counter() - epoch_started

        metrics = {"epoch": epoch + 1, "codebook_loss": losses[:, 0].mean().item(),
                   "rectifier_loss": losses[:, 1].mean().item(), "lr": train.lr_at(epoch)}
        metrics.update(trainer.end_epoch(epoch))
        if val_loader is not None:
            metrics.update(validate(model, val_loader))
        metrics.update(epoch_seconds=time.perf_counter() - epoch_started,
                       samples_per_s=len(loader) * train.batch_size / max(train_seconds, 1e-9))
        history.append(metrics)

        save_checkpoint(run_dir, {"epoch": epoch + 1, "trainer": trainer.state_dict(),
                                  "model_config": model_config.to_dict(), "train_config": train.to_dict(),
                                  "data": data, "resident": loader.resident, "metrics": history})
        write_metrics(run_dir, history)
        model.save_pretrained(run_dir, train=train.to_dict())
        say(_epoch_line(metrics, train.epochs))

    return FitResult(run_dir, model_config, train, epochs_done=len(history), started_at_epoch=start_epoch,
                     history=history, seconds=time.perf_counter() - started)


def _stop_message(epoch: int, step: int, reason: str, good_epochs: int, out: str) -> str:
    kept = f"the checkpoint of epoch {good_epochs} is kept in {out}" if good_epochs else "no epoch had completed"
    return f"training stopped at epoch {epoch + 1}, step {step + 1}: {reason}; {kept} (try a lower --lr)"


def _check_finite(losses: torch.Tensor, start: int, stop: int, epoch: int, good_epochs: int, out: str) -> None:
    window = losses[start:stop]
    finite = torch.isfinite(window).all(dim=1)
    if not bool(finite.all()):
        step = start + int((~finite).nonzero()[0, 0])
        cb, rect = losses[step].tolist()
        raise TrainingStopped(_stop_message(epoch, step, f"non-finite loss (codebook {cb}, rectifier {rect})",
                                            good_epochs, out))


def _epoch_line(m: dict[str, Any], epochs: int) -> str:
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
