"""The ReVQ training step and what an epoch does around it: the machinery behind `revq-pipe fit`.

`Trainer` holds the model, the codebook and rectifier optimizers and the epoch's running numbers;
its state is what a checkpoint holds. The loop that drives it (stages/fit.py) reads:

    trainer.set_epoch(epoch)
    for z in batches:
        trainer.step(z)          # no host sync on CUDA (none between the checks)
        trainer.check()          # every SYNC_EVERY_CUDA steps (every step on the CPU): losses finite?
    trainer.check(last=True)
    metrics = trainer.end_epoch(epoch)   # flush, usage, Non-Activation Reset
    metrics |= trainer.validate(val_loader)

A non-finite value raises `NonFiniteTraining` naming the step: the search refuses NaN/inf latents
or codebooks (`kernels.NonFiniteError`), and `check` reads the losses back and refuses NaN/inf there.

With a `DataParallelGroup` of several processes (pipeline/train/distributed.py), each process steps on its
share of the global batch: the codebook update is the global batch's on every process, the rectifier
is wrapped in DistributedDataParallel, and the losses `check` reads, the epoch's activation counts
(before the reset) and the validation sums are those of all processes together.

Step options (`TrainConfig.step_options`, all off by default; each computes the default step's
result to float rounding, which tests hold them to):
- `fused-quantize`: the search's final pass also writes the chosen codes and their gradients, and
  the codebook loss is the sum of its distances (kernels/quantize.py): three passes fewer;
- `fused-adamw`: the sparse codebook update as two Triton kernels (kernels/sparse_adamw.py);
- `cuda-graph`: the whole step captured once per epoch and replayed (pipeline/train/step_graph.py;
  needs fused-adamw; CUDA only, ignored on the CPU);
- `channels-last`: the rectifier's convolutions on channels-last tensors, which its per-position
  linear layers and norms read without transposing;
- `max-autotune`: the rectifier compiled with torch.compile's max-autotune (no CUDA graphs of its
  own), which searches kernel configurations for its matrix products and fusions;
- `screen-search`: the fused-quantize pass searches with the screen method (search_kernels.py;
  the same codes, fewer instructions per pair, more registers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from revq_pipe.kernels import NonFiniteError
from revq_pipe.kernels.quantize import quantize
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.codebook_optim import codebook_optimizer
from revq_pipe.pipeline.model.config import use_compile
from revq_pipe.pipeline.train.config import TrainConfig
from revq_pipe.pipeline.train.distributed import DataParallelGroup
from revq_pipe.pipeline.train.loader import LatentLoader
from revq_pipe.pipeline.model.revq import ReVQ, latent_metrics, usage_stats
from revq_pipe.pipeline.seeds import stream_generator
from revq_pipe.pipeline.train.step_graph import CapturedStep

# On CUDA, losses are read back to the host (one device sync) every this many steps, for the
# progress bar and the non-finite check; in between the GPU runs ahead. On the CPU, every step.
SYNC_EVERY_CUDA = 25
# Step options whose step updates the codebooks without the data-parallel exchange: one process only.
ONE_PROCESS_OPTIONS = {"fused-quantize", "cuda-graph"}


class NonFiniteTraining(Exception):
    """Training met NaN or inf at `step` (0-based, within the epoch)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class Trainer:
    """The model, its two optimizers and one training step; `state_dict` is what a checkpoint holds.

    `sync_every` is how many steps run between the host reads of `check` (default: SYNC_EVERY_CUDA
    on CUDA, 1 on the CPU); above 1, no step reads anything back from the device.
    """

    def __init__(self, model: ReVQ, train: TrainConfig, group: DataParallelGroup = DataParallelGroup(), *,
                 sync_every: int | None = None):
        self.model, self.train, self.group = model, train, group
        device = model.device
        self.cuda = device.type == "cuda"
        options = set(train.step_options)
        if group.distributed and options & ONE_PROCESS_OPTIONS:
            raise UserError(f"step options {', '.join(sorted(options & ONE_PROCESS_OPTIONS))} run on one process only")
        self.sync_every = sync_every or (SYNC_EVERY_CUDA if self.cuda else 1)
        self.codebook_opt = group.shared_codebook_update(codebook_optimizer(
            train.codebook_update, model.codebooks, lr=train.lr, max_grad_norm=train.grad_clip,
            fused="fused-adamw" in options, host_reads=self.sync_every == 1))
        self.fused_quantize = "fused-quantize" in options
        self.search_method = "screen" if "screen-search" in options else "exact"
        self.channels_last = "channels-last" in options
        graph = "cuda-graph" in options and self.cuda
        self.rectifier_params = list(model.rectifier.parameters())
        self.rectifier_opt = (
            torch.optim.AdamW(self.rectifier_params, lr=train.lr * train.rectifier_lr_scale,
                              weight_decay=train.rectifier_weight_decay, fused=True if self.cuda else None,
                              capturable=graph)
            if self.rectifier_params else None
        )
        # Each optimizer with its share of the one learning-rate schedule.
        self.schedule = [(self.codebook_opt, 1.0)]
        if self.rectifier_opt is not None:
            self.schedule.append((self.rectifier_opt, train.rectifier_lr_scale))
        self.rectify = self._rectifier(options)
        self.counts = torch.zeros(model.config.tokens, model.config.codes, dtype=torch.int32, device=device)
        self.captured = CapturedStep(self._step) if graph else None
        self.losses: list[torch.Tensor] = []  # this epoch's [codebook, rectifier] loss per step, on the device
        self.checked = 0  # steps whose losses `check` has read back

    def _rectifier(self, options: set[str]):
        """The rectifier as the step calls it: data parallel, in channels-last memory and compiled
        (max-autotune with that option) where asked. Bf16 autocast and compilation pay off on the GPU
        only (the rectifier is bound by the memory traffic of its small ops); the CPU path stays
        eager fp32 and bit-reproducible."""
        if self.channels_last:
            self.model.rectifier.to(memory_format=torch.channels_last)
        rectify = self.group.data_parallel(self.model.rectifier)
        if use_compile(self.model.device) and self.rectifier_params:
            mode = "max-autotune-no-cudagraphs" if "max-autotune" in options else None
            rectify = torch.compile(rectify, mode=mode)
        return rectify

    def set_epoch(self, epoch: int) -> None:
        """Learning rates of an epoch (exponential decay over the run) and fresh epoch numbers."""
        lr = self.train.lr_at(epoch)
        for optimizer, scale in self.schedule:
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
        if self.captured is not None:
            self.captured.invalidate()  # the captured step holds the old rates
        self.counts.zero_()
        self.losses, self.checked = [], 0

    def step(self, z: torch.Tensor) -> torch.Tensor:
        """One step on a batch of raw latents; returns its [codebook loss, rectifier loss] (no host
        sync when `sync_every` > 1)."""
        losses = self.captured(z) if self.captured is not None else self._step(z)
        self.losses.append(losses)
        return losses

    def _step(self, z: torch.Tensor) -> torch.Tensor:
        model = self.model
        zn = model.preprocessor.normalize(z)
        quantized, codebook_loss = self._learn_codes(model.splitter.split(zn))
        rectifier_input = model.splitter.merge(quantized)
        if self.channels_last:
            rectifier_input = rectifier_input.contiguous(memory_format=torch.channels_last)
        # A captured step must not keep autocast's cast weights between steps.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=self.captured is None):
            rectified = self.rectify(rectifier_input)
        rectifier_loss = F.mse_loss(rectified.float(), zn)
        if self.rectifier_opt is not None:
            rectifier_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.rectifier_params, self.train.grad_clip)
            self.rectifier_opt.step()
            self.rectifier_opt.zero_grad(set_to_none=True)
        return torch.stack([codebook_loss.detach(), rectifier_loss.detach()])

    def _learn_codes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Search, count and update the codebooks from (B, T, d) tokens; returns the chosen codes
        (before the update) and the codebook loss. With fused-quantize the search's last pass also
        gathers the codes and their gradients (kernels/quantize.py)."""
        model = self.model
        # With sync_every > 1 the search's NaN/inf check (a sync) is left to `check`.
        check_finite = self.sync_every == 1
        try:
            if self.fused_quantize:
                ids, quantized, loss, token_grads = quantize(tokens.transpose(0, 1), model.codebooks, counts=self.counts,
                                                             check_finite=check_finite, method=self.search_method)
                self.codebook_opt.apply(ids.t(), token_grads.transpose(0, 1))
                return quantized.transpose(0, 1), loss
            ids = model.quantizer.search(tokens, self.counts, check_finite=check_finite)
        except NonFiniteError as err:
            raise NonFiniteTraining(len(self.losses), str(err)) from None
        return self.codebook_opt.learn(ids, tokens)

    def check(self, last: bool = False) -> list[float] | None:
        """Every `sync_every` steps, and with `last`: read the unchecked losses back (one device
        sync) and raise NonFiniteTraining at the first non-finite one. Returns the latest step's
        [codebook, rectifier] losses when it read them, else None."""
        done = len(self.losses)
        if done == self.checked or (done - self.checked < self.sync_every and not last):
            return None
        window = self.group.mean(torch.stack(self.losses[self.checked:done]))  # every process stops alike
        finite = torch.isfinite(window).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            codebook, rectifier = window[bad].tolist()
            raise NonFiniteTraining(self.checked + bad, f"non-finite loss (codebook {codebook}, rectifier {rectifier})")
        self.checked = done
        return window[-1].tolist()

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's mean losses and code usage, then the Non-Activation Reset (when enabled)."""
        self.codebook_opt.flush()  # codebooks and moments as dense AdamW has them now
        losses = (self.group.mean(torch.stack(self.losses).mean(dim=0)).tolist() if self.losses
                  else [float("nan")] * 2)
        self.group.sum_(self.counts)  # the reset moves the codes no process chose
        metrics = {"codebook_loss": losses[0], "rectifier_loss": losses[1], **usage_stats(self.counts)}
        moved = 0
        if self.train.reset:
            generator = stream_generator(self.train.seed, "reset_noise", epoch, device=self.model.device)
            positions, codes = self.model.quantizer.reset_unused(
                self.counts, ratio=self.train.reset_ratio, noise=self.train.reset_noise, generator=generator)
            moved = len(codes)
            # Moments of a moved code describe its old place; dense AdamW's would have decayed to ~0
            # over an epoch without gradient anyway.
            self.codebook_opt.forget(positions, codes)
        self.group.check_identical(f"the codebooks after epoch {epoch + 1}", self.model.codebooks)
        return {**metrics, "codes_reset": moved}

    @torch.inference_mode()
    def validate(self, loader: LatentLoader) -> dict[str, float]:
        """Latent MSE on a store (normalised and raw) of quantize-then-rectify and of the quantizer
        alone, and its code usage, in eval mode."""
        self.model.eval()
        metrics = latent_metrics(self.model, loader.epoch(), sum_over_processes=self.group.sum_)
        self.model.train()
        return {"val_mse": metrics["latent_mse_normalised"], "val_mse_raw": metrics["latent_mse"],
                "val_mse_quantizer": metrics["quantizer_mse_normalised"],
                "val_mse_quantizer_raw": metrics["quantizer_mse"],
                "val_usage_mean_pct": metrics["usage_mean_pct"], "val_perplexity": metrics["perplexity"]}

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
