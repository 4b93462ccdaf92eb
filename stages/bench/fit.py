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

`variants` adds rows for the project's step with step options (`TrainConfig.step_options`, e.g.
`fused-quantize+fused-adamw+cuda-graph`), each from the same starting model, one at a time in memory:
the options are compared with the default step, and each other, in one run. `profile_dir`
profiles `profile_steps` more steps of every kind (pipeline/reporting/profiling.py) and writes
one summary per kind there, plus the default step's trace.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import logging

import torch
import torch.nn.functional as F

from revq_pipe.pipeline.reporting.bench_options import PROJECT, parse_variants
from revq_pipe.pipeline.reporting.benchmarking import mean_seconds, reference_search
from revq_pipe.pipeline.reporting.profiling import profile_calls
from revq_pipe.pipeline.train.config import FitConfig, TrainConfig
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.train.loader import free_memory
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.train.trainer import Trainer

log = logging.getLogger(__name__)

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
    profiles: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    def samples_per_s(self, name: str) -> float:
        return self.batch_size / (self.ms[name] / 1000)

    def hours(self, name: str) -> float:
        return EPOCHS * IMAGENET_TRAIN_IMAGES / self.samples_per_s(name) / 3600

    def report(self) -> str:
        ref = self.ms[REFERENCE]
        lines = [f"bench fit: {self.preset} (T={self.tokens}, K={self.codes}, d={self.dim}), batch {self.batch_size}, "
                 f"latents {DCAE_F32C32_LATENT}, {self.steps} timed steps on {self.device}; "
                 f"this project's codebook update: {self.codebook_update} AdamW",
                 f"  {'step':<58}{'ms/step':>10}{'samples/s':>12}{'100 ep. h':>11}{'peak GiB':>10}{'vs ref':>8}"]
        for name in sorted(self.ms, key=lambda n: n == REFERENCE):  # measured first, shown last
            peak = f"{self.peak_gib[name]:.1f}" if name in self.peak_gib else "-"
            lines.append(f"  {name:<58}{self.ms[name]:>10.1f}{self.samples_per_s(name):>12.0f}"
                         f"{self.hours(name):>11.2f}{peak:>10}{ref / self.ms[name]:>7.2f}x")
        lines += [f"  {name:<58}failed: {error}" for name, error in self.failures.items()]
        ours = self.ms[PROJECT]
        lines.append(f"  speed-up: {ref / ours:.2f}x; projected hours for {EPOCHS} epochs of "
                     f"{IMAGENET_TRAIN_IMAGES:,} images at this batch size")
        reference = self.first_losses[REFERENCE]
        for name, losses in self.first_losses.items():
            if name == REFERENCE:
                continue
            agree = all(math.isclose(a, b, rel_tol=2e-2) for a, b in zip(losses, reference))
            lines.append(f"  first step from the same state (codebook, rectifier loss): {name} {losses[0]:.5f}, "
                         f"{losses[1]:.5f}; reference {reference[0]:.5f}, {reference[1]:.5f} -> "
                         + ("agree" if agree else "DIFFER"))
        return "\n".join(lines + self.profiles)


REFERENCE = "reference style"


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
    # codebooks: starting copy, model copy x2, sparse moments x2 (+ last step), reference grad + two moments
    need = tokens * codes * (dim * 4 * 8 + 8)
    free = free_memory(device)
    if need > 0.8 * free:
        raise UserError(f"this benchmark needs about {need / 2**30:.1f} GiB for codebooks and optimizer states; "
                        f"{device} has {free / 2**30:.1f} GiB free")


@dataclass
class _Bench:
    """What every timed step shares: the starting model, the batches, the configs."""

    start: ReVQ
    batches: list[torch.Tensor]
    train: TrainConfig
    device: torch.device
    steps: int
    profile_dir: Path | None
    profile_steps: int
    label: str

    def measure(self, name: str, step, result: BenchFitResult) -> None:
        """First-step losses, the timing, the peak memory and (when asked) a profile of one step kind."""
        result.first_losses[name] = step(self.batches[0]).tolist()
        result.ms[name], peak_gib = _time_steps(step, self.batches, self.steps, self.device)
        if self.device.type == "cuda":
            result.peak_gib[name] = peak_gib
        # As each row is measured: a run cut short (a GPU window's time limit) still shows it.
        log.info(f"bench fit {self.label}, {name}: {result.ms[name]:.2f} ms/step, peak {peak_gib:.2f} GiB")
        if self.profile_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{self.label}-{name}")
            cycle = itertools.cycle(self.batches)
            profiled = profile_calls(lambda: step(next(cycle)), self.profile_steps, self.device,
                                     trace=self.profile_dir / f"{slug}.json.gz" if name == PROJECT else None)
            text = profiled.report(f"bench fit {self.label}, {name}")
            (self.profile_dir / f"{slug}.txt").write_text(text + "\n")
            result.profiles.append(text)


def bench_fit(fit_config: FitConfig | None = None, steps: int = 20, variants: str = "default",
              profile_dir: Path | None = None, profile_steps: int = 20) -> BenchFitResult:
    """Time `steps` training steps of this project (each variant of its step) and of the reference
    style on random latents, with the model and training `fit_config` gives for ImageNet's DC-AE
    latents (default: 512T_NC=16384); with `profile_dir`, profile `profile_steps` more steps of each
    and write the summaries (and the default step's trace) there."""
    fit_config = fit_config or FitConfig.from_preset("512T_NC=16384")
    dev = resolve_device(fit_config.device)
    resolved = fit_config.resolve(IMAGENET_TRAIN_IMAGES, DCAE_F32C32_LATENT, device=dev)
    config, train, preset = resolved.model, resolved.train, resolved.model.preset
    codebook_update = fit_config.overrides.get("codebook_update", "auto")
    kinds = [(name, _variant_config(train, options, codebook_update)) for name, options in parse_variants(variants)]
    _check_memory(config.tokens, config.codes, config.dim, dev)
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    start = ReVQ(config).to(dev)  # random latents are already standardised: mean 0, std 1
    batches = [torch.randn(train.batch_size, *DCAE_F32C32_LATENT, device=dev) for _ in range(4)]
    with torch.no_grad():  # codebooks from random tokens, as fit initialises them from data
        start.codebooks.copy_(torch.randn_like(start.codebooks))
    bench = _Bench(start, batches, train, dev, steps, Path(profile_dir) if profile_dir else None, profile_steps,
                   preset)
    result = BenchFitResult(preset=preset, device=str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                            codebook_update=train.codebook_update, batch_size=train.batch_size, tokens=config.tokens,
                            codes=config.codes, dim=config.dim, steps=steps, ms={}, first_losses={}, peak_gib={})
    # The reference first: it compiles nothing, so a run cut short still has the baseline.
    bench.measure(REFERENCE, ReferenceStep(copy.deepcopy(start), train).step, result)
    _release(dev)
    for name, variant_train in kinds:
        try:
            trainer = Trainer(copy.deepcopy(start), variant_train)
            trainer.set_epoch(0)
            bench.measure(name, trainer.step, result)
        except Exception as err:  # a variant that fails is reported; the default step's row must not
            if name == PROJECT:
                raise
            result.failures[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        trainer = None  # one variant's codebooks and optimizer states at a time
        _release(dev)
    return result


def _variant_config(train: TrainConfig, options: tuple[str, ...], codebook_update: str) -> TrainConfig:
    """The training config of one variant (an impossible combination is refused before any work);
    fused-adamw is the sparse update's kernel, so it brings the sparse update where the choice is auto."""
    if codebook_update == "auto" and "fused-adamw" in options:
        return dataclasses.replace(train, step_options=options, codebook_update="sparse")
    return dataclasses.replace(train, step_options=options)


def _release(device: torch.device) -> None:
    """Hand a finished variant's memory back, so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
