"""`revq-pipe bench fit`: samples/s of a training step, this project's beside the reference code's style.

Both steps start from the same model and train on the same random latents of the preset's shape
(DC-AE f32c32 at 256 px: (32, 8, 8)), in one process:
- this project: `pipeline.trainer.Trainer.step`, as `fit` runs it (kernels.nearest_code with fused counts, sparse AdamW on the
  chosen codes, bf16 autocast and torch.compile for the rectifier on CUDA);
- reference style, as the paper's public code does it: nearest code by `torch.cdist` under
  `torch.vmap` (2 groups at a time), counts by scatter_add, fp32 throughout, one dense AdamW over
  codebooks and rectifier, autograd through the codebook lookup.
It prints ms/step, samples/s and the projected hours for 100 epochs of ImageNet (1,281,167 images).
Each kind of step is timed over exactly `steps` steps, after the first one and Timer's warm-up, by
`torch.utils.benchmark.Timer`: do_bench would choose its own count, and its L2-flush buffer would
count in the peak memory.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from revq_pipe.pipeline.reporting.benchmarking import mean_seconds, reference_search
from revq_pipe.pipeline.train.config import FitConfig, TrainConfig
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.loader import free_memory
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.train.trainer import Trainer

DCAE_F32C32_LATENT = (32, 8, 8)
IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 100


class ReferenceStep:
    """One training step the way the paper's public code writes it (fp32, cdist search, dense AdamW)."""

    def __init__(self, model: ReVQ, train: TrainConfig):
        self.model, self.train = model, train
        self.counts = torch.zeros(model.config.tokens, model.config.codes, device=model.device)
        self.optimizer = torch.optim.AdamW([
            {"params": [model.codebooks], "lr": train.lr, "weight_decay": 0.0},
            {"params": list(model.rectifier.parameters()), "lr": train.lr * train.rectifier_lr_scale,
             "weight_decay": train.rectifier_weight_decay},
        ])

    def step(self, z: torch.Tensor) -> torch.Tensor:
        model = self.model
        self.optimizer.zero_grad()
        zn = model.preprocessor.normalize(z)
        tokens = model.splitter.split(zn)
        x = tokens.transpose(0, 1)  # (T, B, d)
        with torch.no_grad():
            ids, _ = reference_search(x, model.codebooks)
            self.counts.scatter_add_(-1, ids, torch.ones_like(ids, dtype=self.counts.dtype))
        quantized = model.quantizer.lookup(ids.t())
        codebook_loss = F.mse_loss(tokens, quantized)
        rectifier_loss = F.mse_loss(model.rectifier(model.splitter.merge(quantized.detach())), zn)
        (codebook_loss + rectifier_loss).backward()
        torch.nn.utils.clip_grad_norm_([model.codebooks], self.train.grad_clip)
        torch.nn.utils.clip_grad_norm_(list(model.rectifier.parameters()), self.train.grad_clip)
        self.optimizer.step()
        return torch.stack([codebook_loss.detach(), rectifier_loss.detach()])


@dataclass
class BenchFitResult:
    preset: str
    device: str
    codebook_update: str
    batch_size: int
    tokens: int
    codes: int
    dim: int
    steps: int
    ms: dict[str, float]
    first_losses: dict[str, list[float]]
    peak_gib: dict[str, float]

    def samples_per_s(self, name: str) -> float:
        return self.batch_size / (self.ms[name] / 1000)

    def hours(self, name: str) -> float:
        return EPOCHS * IMAGENET_TRAIN_IMAGES / self.samples_per_s(name) / 3600

    def report(self) -> str:
        lines = [f"bench fit: {self.preset} (T={self.tokens}, K={self.codes}, d={self.dim}), batch {self.batch_size}, "
                 f"latents {DCAE_F32C32_LATENT}, {self.steps} timed steps on {self.device}; "
                 f"this project's codebook update: {self.codebook_update} AdamW",
                 f"  {'step':<34}{'ms/step':>10}{'samples/s':>12}{'100 ep. h':>11}{'peak GiB':>10}"]
        for name in self.ms:
            peak = f"{self.peak_gib[name]:.1f}" if name in self.peak_gib else "-"
            lines.append(f"  {name:<34}{self.ms[name]:>10.1f}{self.samples_per_s(name):>12.0f}"
                         f"{self.hours(name):>11.2f}{peak:>10}")
        ours, ref = self.ms["this project"], self.ms["reference style"]
        lines.append(f"  speed-up: {ref / ours:.2f}x; projected hours for {EPOCHS} epochs of "
                     f"{IMAGENET_TRAIN_IMAGES:,} images at this batch size")
        cb = self.first_losses
        agree = all(math.isclose(a, b, rel_tol=2e-2) for a, b in zip(cb["this project"], cb["reference style"]))
        lines.append("  first step from the same state (codebook, rectifier loss): "
                     f"project {cb['this project'][0]:.5f}, {cb['this project'][1]:.5f}; reference "
                     f"{cb['reference style'][0]:.5f}, {cb['reference style'][1]:.5f} -> "
                     + ("agree" if agree else "DIFFER"))
        return "\n".join(lines)


def _time_steps(step, batches: list[torch.Tensor], steps: int, device: torch.device) -> tuple[float, float]:
    """Mean ms per step over `steps` steps (after Timer's warm-up steps) and the peak GiB of all of them."""
    cycle = itertools.cycle(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = mean_seconds(lambda: step(next(cycle)), steps) * 1000
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def _check_memory(tokens: int, codes: int, dim: int, device: torch.device) -> None:
    # codebooks: model copy x2, sparse moments x2 (+ last step), reference grad + two moments
    need = tokens * codes * (dim * 4 * 7 + 8)
    free = free_memory(device)
    if need > 0.8 * free:
        raise UserError(f"this benchmark needs about {need / 2**30:.1f} GiB for codebooks and optimizer states; "
                        f"{device} has {free / 2**30:.1f} GiB free")


def bench_fit(fit_config: FitConfig | None = None, steps: int = 20) -> BenchFitResult:
    """Time `steps` training steps of this project and of the reference style on random latents, with
    the model and training `fit_config` gives for ImageNet's DC-AE latents (default: 512T_NC=16384)."""
    fit_config = fit_config or FitConfig.from_preset("512T_NC=16384")
    dev = resolve_device(fit_config.device)
    resolved = fit_config.resolve(IMAGENET_TRAIN_IMAGES, DCAE_F32C32_LATENT, device=dev)
    config, train = resolved.model, resolved.train
    b = train.batch_size
    _check_memory(config.tokens, config.codes, config.dim, dev)

    torch.manual_seed(0)
    model = ReVQ(config).to(dev)  # random latents are already standardised: mean 0, std 1
    batches = [torch.randn(b, *DCAE_F32C32_LATENT, device=dev) for _ in range(4)]
    with torch.no_grad():  # codebooks from random tokens, as fit initialises them from data
        model.codebooks.copy_(torch.randn_like(model.codebooks))
    reference_model = copy.deepcopy(model)

    ours, reference = Trainer(model, train), ReferenceStep(reference_model, train)
    ours.set_epoch(0)
    first = {"this project": ours.step(batches[0]).tolist(), "reference style": reference.step(batches[0]).tolist()}
    ms, peak = {}, {}
    for name, step in (("this project", ours.step), ("reference style", reference.step)):
        ms[name], peak_gib = _time_steps(step, batches, steps, dev)
        if dev.type == "cuda":
            peak[name] = peak_gib
    return BenchFitResult(preset=config.preset, device=str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                          codebook_update=train.codebook_update, batch_size=b, tokens=config.tokens, codes=config.codes, dim=config.dim, steps=steps,
                          ms=ms, first_losses=first, peak_gib=peak)
