"""How `fit` trains (`TrainConfig`), and the one object a user hands `fit` (`FitConfig`).

`FitConfig` is a preset name and the user's overrides of any setting of the model (`ReVQConfig`)
or of training (`TrainConfig`): the fields whose metadata holds a `Setting`. `fit` resolves it
once, against its training store and device, into the two configs (`FitConfig.resolve`):
`config.json` is the model's, `training.json` records the training config and the `FitConfig` as
given. The CLI makes one option per setting from the same metadata (cli.py), so a new setting is
one field with its `setting(...)`, here or in pipeline/model/config.py.

The `auto` preset (the default) picks the paper's `512T_NC=16384` when the store holds at least
`MIN_LATENTS_PER_CODE` latents per code of it, else `tiny`, with K and the batch cut to what the
store can teach. This module imports nothing heavy: the CLI checks a `FitConfig` before torch loads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from revq_pipe.pipeline.device import DEVICE_HELP, DEVICES
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.config import (PRESETS, ReVQConfig, Setting, preset_help, preset_values,
                                             resolve_model_config, setting, settings_of)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CODEBOOK_INITS = ("kmeans", "random")
CODEBOOK_UPDATES = ("sparse", "dense")
# Opt-in ways to run the same training step faster on CUDA (pipeline/train/trainer.py says what each
# does; none changes a result beyond float rounding). `bench fit --variants` times them side by side.
STEP_OPTIONS = ("fused-quantize", "fused-adamw", "cuda-graph", "channels-last", "max-autotune", "screen-search")
AUTO = "auto"
PAPER_PRESET = "512T_NC=16384"
SMALL_PRESET = "tiny"
# Fewer latents per code than this and the codebooks tend to memorise the training set.
MIN_LATENTS_PER_CODE = 8


@dataclass
class TrainConfig:
    """How `fit` trains: the paper's recipe (AdamW, exponential decay to 5%, grad clip 1, reset)."""

    epochs: int = setting("Epochs", 100, metavar="N", minimum=1, from_preset=True)
    batch_size: int = setting("Latents per step (under torchrun: all processes together)", 256, metavar="N",
                              minimum=1, from_preset=True)
    lr: float = setting("Codebook learning rate (the rectifier's is --rectifier-lr-scale times it), decayed "
                        "exponentially to --final-lr-fraction of it over the run", 0.01, metavar="F")
    rectifier_lr_scale: float = setting("The rectifier's learning rate as a fraction of --lr", 0.05, metavar="F",
                                        minimum=0)
    rectifier_weight_decay: float = setting("AdamW weight decay of the rectifier (the codebooks have none)", 1e-4,
                                            metavar="F", minimum=0)
    grad_clip: float = setting("Gradient norm clip, of the codebooks and of the rectifier each", 1.0, metavar="F")
    final_lr_fraction: float = setting("Where the learning rates' exponential decay ends, as a fraction of "
                                       "their start", 0.05, metavar="F")
    reset: bool = setting("Ablation: no Non-Activation Reset.", True, flag="--no-reset")
    reset_ratio: float = setting("Non-Activation Reset: at most this fraction of each codebook moves at an "
                                 "epoch end", 0.2, metavar="F")
    reset_noise: float = setting("Non-Activation Reset: the standard deviation of the noise added to each "
                                 "moved code", 0.1, metavar="F", minimum=0)
    seed: int = setting("Seeds every random stream (codebook init, data order, reset noise, rectifier init), "
                        "each its own", 0, metavar="N", minimum=0)
    # "random": code k of every position starts as the token of the k-th of K distinct random samples
    # (the paper's way); "kmeans": those, refined by `kmeans_iters` Lloyd iterations per position on
    # a sample of the store, searching at most `kmeans_budget` x N latents in all (codebook_init.py).
    codebook_init: str = setting("kmeans (K distinct samples refined by Lloyd iterations on a larger sample, "
                                 "bounded by --kmeans-budget) or random (the K samples alone, the paper's way)",
                                 "kmeans", choices=CODEBOOK_INITS)
    kmeans_iters: int = setting("The most Lloyd iterations of --codebook-init kmeans (fewer where its budget "
                                "says so)", 10, metavar="N", minimum=1)
    kmeans_budget: float = setting("The most --codebook-init kmeans may search, in times the store's latents (an "
                                   "epoch searches each once, and costs more than 10 such searches with the "
                                   "rectifier and optimizers: 4 keeps k-means well under one epoch)", 4.0,
                                   metavar="F", minimum=0)
    # Each sample of an epoch is its image's latent or its flipped image's, at random (stores made
    # with `encode --flip`; see loader.py). `fit`'s default: when the store has them.
    flip: bool = setting("Ignore the store's flipped latents (encode --flip); by default fit trains on them too.",
                         False, flag="--no-flip")
    # "sparse": AdamW that touches only the chosen codes each step (dense AdamW's updates, with each
    # code's momentum tail applied at once; see codebook_optim.py); "dense": torch AdamW over all codes.
    codebook_update: str = setting("auto (sparse on CUDA, dense on CPU), sparse (AdamW touching only the "
                                   "chosen codes) or dense (AdamW over all codes, the reference's way)", "sparse",
                                   choices=(AUTO, *CODEBOOK_UPDATES), shown_default=AUTO)
    # A run extended past its first epochs keeps its decay, and its extra epochs train at the decay's end value.
    lr_decay_epochs: int | None = setting("Epochs the learning-rate decay spans; later epochs train at its end "
                                          "value", None, metavar="N", minimum=1, shown_default="--epochs")
    # Any of STEP_OPTIONS ("a+b" from the command line); the default step is the one each is checked against.
    step_options: tuple[str, ...] = setting(f"Opt-in variants of the CUDA training step, joined by + "
                                            f"({', '.join(STEP_OPTIONS)})", (), metavar="OPTION+...",
                                            shown_default="none")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"epochs and batch size must be positive (got {self.epochs}, {self.batch_size})")
        for name in ("lr", "grad_clip", "final_lr_fraction"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a positive number, not {value}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise UserError(f"unknown codebook update {self.codebook_update!r}: use auto, {' or '.join(CODEBOOK_UPDATES)}")
        if not 0 < self.reset_ratio <= 1:
            raise UserError(f"reset ratio must be in (0, 1], not {self.reset_ratio}")
        if self.seed < 0:
            raise UserError(f"`seed` must be a non-negative integer, not {self.seed}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise UserError(f"unknown codebook init {self.codebook_init!r}: use {' or '.join(CODEBOOK_INITS)}")
        if self.kmeans_iters < 1:
            raise UserError(f"k-means needs at least one iteration, not {self.kmeans_iters}")
        if self.lr_decay_epochs is None:
            self.lr_decay_epochs = self.epochs
        self._check_step_options()

    def _check_step_options(self) -> None:
        options = self.step_options.split("+") if isinstance(self.step_options, str) else self.step_options
        self.step_options = tuple(option for option in options if option)
        unknown = sorted(set(self.step_options) - set(STEP_OPTIONS))
        if unknown:
            raise UserError(f"unknown step option {', '.join(unknown)}: use any of {', '.join(STEP_OPTIONS)}")
        if "fused-adamw" in self.step_options and self.codebook_update != "sparse":
            raise UserError("step option fused-adamw is the sparse codebook update's kernel: use "
                            "`codebook_update=sparse`")
        if "screen-search" in self.step_options and "fused-quantize" not in self.step_options:
            raise UserError("step option screen-search is a method of the fused-quantize pass: add fused-quantize")
        if "cuda-graph" in self.step_options and "fused-adamw" not in self.step_options:
            raise UserError("step option cuda-graph needs fused-adamw too: the captured step must count its steps "
                            "on the GPU")

    def lr_at(self, epoch: int) -> float:
        """Codebook learning rate for an epoch: exponential decay reaching `final_lr_fraction` after
        `lr_decay_epochs` (the run), and that value for the epochs of an extension after them."""
        return self.lr * self.final_lr_fraction ** (min(epoch, self.lr_decay_epochs) / self.lr_decay_epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Rebuild from `to_dict()` output. Checkpoints written before k-means became the default hold
        every field they had, so a missing `codebook_init` is that of a run older than the field: random."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"codebook_init": "random", **{k: v for k, v in values.items() if k in names}})


def resolve_train_config(preset: str, *, device: torch.device | None = None, **overrides: Any) -> TrainConfig:
    """The training config for a preset, with the user's `overrides` of any setting of `TrainConfig`.

    `codebook_update` "auto" (the default) picks "sparse" on CUDA, where codebooks are large and its
    momentum tails run compiled, and "dense" on the CPU, where the small codebooks of CPU runs make
    dense AdamW the cheaper of the two (they train the same: see codebook_optim.py).
    """
    p = preset_values(preset)
    values = {name: p[name] if s.from_preset else s.default for name, s in settings_of(TrainConfig).items()}
    values.update({name: value for name, value in overrides.items() if value is not None})
    if overrides.get("codebook_update", AUTO) == AUTO:
        values["codebook_update"] = "sparse" if device is not None and device.type == "cuda" else "dense"
    return TrainConfig(**values)


# Every setting a FitConfig may override, model's then training's, each under its field's name.
MODEL_SETTINGS = settings_of(ReVQConfig)
TRAIN_SETTINGS = settings_of(TrainConfig)


@dataclass(frozen=True)
class ResolvedFit:
    """A `FitConfig` resolved against a store and a device: the model, the training, and the line that
    says what the `auto` preset chose (None for a named preset)."""

    model: ReVQConfig
    train: TrainConfig
    note: str | None = None


@dataclass(frozen=True)
class FitConfig:
    """What to fit: a preset (`auto` by default), the device, and overrides of any setting (`settings()`).

        FitConfig.from_preset("tiny", codes=64, epochs=5, device="cpu")

    Unknown names and values outside a setting's choices or bounds are refused at once (`UserError`);
    `fit` resolves it against the training store and the device (`resolve`).
    """

    preset: str = setting(f"A preset fixes the code dim d and the codes per token position K (and the rectifier "
                          f"size, batch and epochs); the tokens per image T = C*H*W/d follow from the store's "
                          f"latent shape. auto: {PAPER_PRESET} when the store holds at least {MIN_LATENTS_PER_CODE} "
                          f"latents per code, else {SMALL_PRESET} (K and the batch cut to fit a small store). "
                          f"{preset_help()}", AUTO, metavar="NAME")
    device: str = setting(DEVICE_HELP, AUTO, metavar="|".join(DEVICES))
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset != AUTO:
            preset_values(self.preset)
        settings = FitConfig.settings()
        unknown = sorted(set(self.overrides) - settings.keys())
        if unknown:
            raise UserError(f"unknown fit setting {unknown[0]!r}: choose from {', '.join(settings)}")
        given = {name: value for name, value in self.overrides.items() if value is not None}
        for name, value in given.items():
            settings[name].check(value)
        object.__setattr__(self, "overrides", given)

    @classmethod
    def from_preset(cls, preset: str = AUTO, *, device: str = AUTO, **overrides: Any) -> "FitConfig":
        """A preset with overrides of any setting by its field's name (None: the preset's or the default)."""
        return cls(preset=preset, device=device, overrides=overrides)

    @staticmethod
    def settings() -> dict[str, Setting]:
        """Every setting a FitConfig may override: the model's, then training's."""
        return {**MODEL_SETTINGS, **TRAIN_SETTINGS}

    def with_overrides(self, **overrides: Any) -> "FitConfig":
        """This config with more overrides (theirs win)."""
        return FitConfig(self.preset, self.device, {**self.overrides, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Flat, as `from_dict` and `training.json` take it: preset, device and the overrides."""
        return {"preset": self.preset, "device": self.device, **self.overrides}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitConfig":
        return cls.from_preset(**values)

    def resolve(self, count: int, latent_shape: tuple[int, int, int], *, device: torch.device,
                has_flip: bool = False, vae: str | None = None, image_size: int | None = None,
                store: str = "the store") -> ResolvedFit:
        """The model and training configs for a store of `count` latents of `latent_shape` (with
        flipped ones when `has_flip`, whose VAE and image size `vae`, `image_size` name) on `device`.
        Refuses what the store cannot train (K > N, a batch larger than N), naming what fits."""
        preset, fitted, note = self._preset_for(count, store)
        given = {**fitted, **self.overrides}
        model = resolve_model_config(preset, latent_shape, vae=vae, image_size=image_size,
                                     **{k: v for k, v in given.items() if k in MODEL_SETTINGS})
        train = resolve_train_config(preset, device=device, **{"flip": has_flip, **{
            k: v for k, v in given.items() if k in TRAIN_SETTINGS}})
        if train.flip and not has_flip:
            raise UserError(f"{store} holds no flipped latents: encode it again with them to train with them")
        warning = check_codes_fit_data(model, count, store, from_preset="codes" not in self.overrides)
        check_batch_fits(train.batch_size, count, preset, store, from_preset="batch_size" not in self.overrides)
        if warning:  # after every refusal: a refused run needs no warning
            log.warning(warning)
        return ResolvedFit(model, train, note)

    def _preset_for(self, count: int, store: str) -> tuple[str, dict[str, int], str | None]:
        """The preset to resolve (`auto`'s choice for `count` latents), the values `auto` cut to fit the
        store (K at most N/8, the batch at most N; the user's own overrides win), and the line that says so."""
        if self.preset != AUTO:
            return self.preset, {}, None
        paper_needs = MIN_LATENTS_PER_CODE * PRESETS[PAPER_PRESET]["codes"]
        if count >= paper_needs:
            return PAPER_PRESET, {}, f"preset auto: {PAPER_PRESET}, the paper's ({count:,} latents)"
        codes = fitting_codes(count)
        if codes is None:
            raise UserError(f"{store} holds {count} latents: fit needs at least {MIN_LATENTS_PER_CODE}")
        small = PRESETS[SMALL_PRESET]
        fitted = {"codes": min(codes, small["codes"]), "batch_size": min(count, small["batch_size"])}
        fitted = {k: v for k, v in fitted.items() if v != small[k] and k not in self.overrides}
        cut = "".join(f", {'K' if k == 'codes' else 'batch'}={v}" for k, v in fitted.items())
        return SMALL_PRESET, fitted, (f"preset auto: {SMALL_PRESET}{cut} for {count:,} latents ({PAPER_PRESET} "
                                      f"needs {paper_needs:,}: {MIN_LATENTS_PER_CODE} per code; `preset` chooses)")


def fitting_codes(count: int) -> int | None:
    """The most codes per position `count` latents teach without memorising them: N/8 rounded down
    to a power of two (None below 8 latents)."""
    per_code = count // MIN_LATENTS_PER_CODE
    return 2 ** int(math.log2(per_code)) if per_code >= 1 else None


def check_codes_fit_data(config: ReVQConfig, n: int, store: str, *, from_preset: bool) -> str | None:
    """Refuse K codes per position that N latents cannot initialise (K > N), and return a warning
    where they would be memorised rather than learned (K > N/8: fewer than 8 latents per code),
    naming a fix: the tiny preset (with K = N/8 where its 128 codes are too many), or K = N/8 rounded
    down to a power of two."""
    k = config.codes
    if k <= n // MIN_LATENTS_PER_CODE:
        return None
    sensible = fitting_codes(n)
    tiny = PRESETS[SMALL_PRESET]["codes"]
    fixes = []
    if from_preset and config.preset != SMALL_PRESET and sensible is not None:
        # the tiny preset's smaller rectifier and batch suit small stores too
        fixes.append(f"`preset=tiny` (K={tiny})" if sensible >= tiny else f"`preset=tiny` `codes={sensible}`")
    if sensible is not None:
        fixes.append(f"`codes={sensible}` (at most N/{MIN_LATENTS_PER_CODE})")
    fix = " or ".join(fixes) if fixes else f"a store of at least {MIN_LATENTS_PER_CODE * k} latents"
    what = f"K={k} codes per position" + (f" (preset {config.preset})" if from_preset else " (`codes`)")
    if k > n:
        raise UserError(f"{what} need at least {k} latents to start from, and about {MIN_LATENTS_PER_CODE * k} "
                        f"not to memorise them, but {store} holds {n}: use {fix}")
    return (f"warning: {what} for {n} latents, fewer than {MIN_LATENTS_PER_CODE} per code: the codebooks may "
            f"memorise the training latents; consider {fix}")


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that does not split evenly over the data-parallel processes."""
    if batch_size % world_size:
        lower = batch_size // world_size * world_size
        raise UserError(f"`batch_size={batch_size}` is the global batch and must split evenly over the "
                        f"{world_size} processes: use a multiple of {world_size}"
                        + (f" such as {lower}" if lower else ""))


def check_batch_fits(batch_size: int, n: int, preset: str, store: str, *, from_preset: bool) -> None:
    """Refuse a batch larger than the store, naming where the batch came from and what fits."""
    if batch_size <= n:
        return
    what = f"the batch of {batch_size} latents (preset {preset})" if from_preset else f"`batch_size={batch_size}`"
    fix = f"`batch_size={n}` or less" + ("" if not from_preset or preset == SMALL_PRESET else " or `preset=auto`")
    raise UserError(f"{what} is larger than the store ({store}: {n} latents): use {fix}")
