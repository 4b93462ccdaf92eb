"""Presets and the two configs of a ReVQ run: the model (rebuilds `ReVQ`) and its training.

`ReVQConfig` is everything needed to rebuild the model; `ReVQ.save_pretrained` writes it as the run
dir's `config.json` (flat, diffusers-style). It describes the architecture only (and names the VAE
when that is a hub id or the embedded one), so a published run carries no local paths: where the
training data came from and how `fit` trained (`TrainConfig`) live in the run's training record
(pipeline/train/training_record.py). Impossible combinations raise `UserError` here, before any work starts,
and `check_codes_fit_data` refuses (or warns about) K codes that a store's N latents cannot teach.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revq_pipe.pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SPLITS = ("channel", "spatial")
RECTIFIERS = ("vit", "cnn", "mlp", "none")
# residual: g(q) = q + f(q) with f's last layer zero at initialisation, so the rectifier starts as the
# identity and can only improve on the bare quantizer; paper: the released code's g(q) = f(q).
RECTIFIER_FORMS = ("residual", "paper")
CODEBOOK_INITS = ("random", "kmeans")
CODEBOOK_UPDATES = ("sparse", "dense")

# The paper's released configs: code dim d and codes K per token position, rectifier width x layers,
# batch size; T follows from the latent shape (C*H*W / d). `tiny` is sized for CPU demos and tests
# on latents like (16, 8, 8) or (32, 8, 8) from small VAEs: it trains in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "512T_NC=16384": dict(dim=4, codes=16384, rectifier_width=512, rectifier_layers=3, batch_size=256, epochs=100),
    "256T_NC=65536": dict(dim=8, codes=65536, rectifier_width=1024, rectifier_layers=4, batch_size=256, epochs=100),
    "256T_NC=262144": dict(dim=8, codes=262144, rectifier_width=512, rectifier_layers=4, batch_size=128, epochs=100),
    "tiny": dict(dim=4, codes=128, rectifier_width=64, rectifier_layers=2, batch_size=64, epochs=20),
}
# Fewer latents per code than this and the codebooks tend to memorise the training set.
MIN_LATENTS_PER_CODE = 8


def preset_help() -> str:
    """What each preset fixes, for `--help`: d and K (T follows from the latents), rectifier, batch, epochs."""
    return "; ".join(f"{name}: d={p['dim']}, K={p['codes']}, rectifier {p['rectifier_width']}x{p['rectifier_layers']}, "
                     f"batch {p['batch_size']}, {p['epochs']} epochs" for name, p in PRESETS.items())


def preset_defaults(key: str) -> str:
    """One setting's value in every preset, for `--help` ("512T_NC=16384: 256, ..., tiny: 64")."""
    return ", ".join(f"{name}: {p[key]}" for name, p in PRESETS.items())


def use_compile(device: torch.device) -> bool:
    """torch.compile on CUDA only (CPU stays eager and bit-reproducible); REVQ_COMPILE=0 turns it off."""
    return device.type == "cuda" and os.environ.get("REVQ_COMPILE", "1") != "0"


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class ReVQConfig:
    """The model: preprocessor, splitter, grouped quantizer (T codebooks of K codes of dim d), rectifier.

    `vae` names the VAE whose latents the model tokenizes, when that name means the same on any
    machine (a Hugging Face id or `revq-pipe-embedded`; None for a local folder or a model built by
    hand), and `image_size` the square size its latents were encoded at: what the image API
    (`ReVQ.tokenize_images`) and the model card need.
    """

    latent_shape: tuple[int, int, int]
    tokens: int
    codes: int
    dim: int
    preset: str = "custom"
    split: str = "channel"
    rectifier: str = "vit"
    rectifier_form: str = "residual"
    rectifier_width: int = 64
    rectifier_layers: int = 2
    attention_head_dim: int = 32
    vae: str | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        self.validate()

    @property
    def latent_numel(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def name(self) -> str:
        """What the model is, in the paper's naming: `{T}T_NC={K}` (e.g. 512T_NC=16384)."""
        return f"{self.tokens}T_NC={self.codes}"

    def validate(self) -> None:
        """Raise `UserError` for a config that cannot be built."""
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise UserError(f"latent shape must be (C, H, W) with positive sizes, not {self.latent_shape}")
        n = self.latent_numel
        if self.tokens < 1 or self.codes < 1 or self.dim < 1:
            raise UserError(f"tokens, codes and dim must be positive (got T={self.tokens}, K={self.codes}, d={self.dim})")
        if self.tokens * self.dim != n:
            raise UserError(f"T={self.tokens} tokens of d={self.dim} do not cover a latent of "
                            f"C*H*W={n} numbers {self.latent_shape}")
        if self.split not in SPLITS:
            raise UserError(f"unknown split {self.split!r}: use {' or '.join(SPLITS)}")
        if self.rectifier not in RECTIFIERS:
            raise UserError(f"unknown rectifier {self.rectifier!r}: use one of {', '.join(RECTIFIERS)}")
        if self.rectifier_form not in RECTIFIER_FORMS:
            raise UserError(f"unknown rectifier form {self.rectifier_form!r}: use {' or '.join(RECTIFIER_FORMS)}")
        if self.rectifier != "none" and (self.rectifier_width < 1 or self.rectifier_layers < 0):
            raise UserError(f"rectifier width must be positive and layers >= 0 (got {self.rectifier_width}x{self.rectifier_layers})")
        if self.rectifier == "vit" and (self.attention_head_dim < 1 or self.rectifier_width % self.attention_head_dim):
            raise UserError(f"the vit rectifier's width {self.rectifier_width} must be a multiple of its "
                            f"attention head dim {self.attention_head_dim}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent_shape"] = list(self.latent_shape)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ReVQConfig":
        """Rebuild from `to_dict()` output; keys that are not fields (the `data` and `train` sections of
        config.json files written before the training record existed) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"latent_shape", "tokens", "codes", "dim"} - values.keys()
        if missing:
            raise UserError(f"model config lacks {', '.join(sorted(missing))}")
        # Runs saved before the residual form existed have no `rectifier_form`: theirs is the paper's.
        values = {"rectifier_form": "paper", **values}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainConfig:
    """How `fit` trains: the paper's recipe (AdamW, exponential decay to 5%, grad clip 1, reset)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01  # codebooks; the rectifier gets lr * rectifier_lr_scale
    rectifier_lr_scale: float = 0.05
    rectifier_weight_decay: float = 1e-4
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.05
    reset: bool = True
    reset_ratio: float = 0.2
    reset_noise: float = 0.1
    seed: int = 0
    # "random": code k of every position starts as the token of the k-th of K distinct random samples
    # (the paper's way); "kmeans": those, refined by `kmeans_iters` Lloyd iterations per position on
    # a bounded sample of the store (see codebook_init.py).
    codebook_init: str = "random"
    kmeans_iters: int = 10
    # Each sample of an epoch is its image's latent or its flipped image's, at random (stores made
    # with `encode --flip`; see loader.py).
    flip: bool = False
    # "sparse": AdamW that touches only the chosen codes each step (dense AdamW's updates, with each
    # code's momentum tail applied at once; see codebook_optim.py); "dense": torch AdamW over all codes.
    codebook_update: str = "sparse"
    # Epochs the exponential decay spans (default: `epochs`). A run extended past its first
    # --epochs keeps its decay, and its extra epochs train at the decay's end value.
    lr_decay_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"epochs and batch size must be positive (got {self.epochs}, {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be a positive number, not {self.lr}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise UserError(f"unknown codebook update {self.codebook_update!r}: use auto, {' or '.join(CODEBOOK_UPDATES)}")
        if not 0 < self.reset_ratio <= 1:
            raise UserError(f"reset ratio must be in (0, 1], not {self.reset_ratio}")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, not {self.seed}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise UserError(f"unknown codebook init {self.codebook_init!r}: use {' or '.join(CODEBOOK_INITS)}")
        if self.kmeans_iters < 1:
            raise UserError(f"k-means needs at least one iteration, not {self.kmeans_iters}")
        if self.lr_decay_epochs is None:
            self.lr_decay_epochs = self.epochs

    def lr_at(self, epoch: int) -> float:
        """Codebook learning rate for an epoch: exponential decay reaching `final_lr_fraction` after
        `lr_decay_epochs` (the run), and that value for the epochs of an extension after them."""
        return self.lr * self.final_lr_fraction ** (min(epoch, self.lr_decay_epochs) / self.lr_decay_epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_model_config(
    preset: str,
    latent_shape: tuple[int, int, int],
    *,
    tokens: int | None = None,
    codes: int | None = None,
    split: str | None = None,
    rectifier: str | None = None,
    rectifier_form: str | None = None,
    rectifier_width: int | None = None,
    rectifier_layers: int | None = None,
    vae: str | None = None,
    image_size: int | None = None,
) -> ReVQConfig:
    """The model config for a preset on latents of `latent_shape`, with the user's off-preset choices.

    The preset fixes d, K and the rectifier's width x layers; T = C*H*W / d unless `tokens` is given,
    in which case d = C*H*W / T.
    """
    p = _preset(preset)
    n = math.prod(latent_shape)
    if tokens is not None:
        if tokens < 1 or n % tokens:
            raise UserError(f"--tokens {tokens} does not divide the latent's C*H*W = {n} numbers {tuple(latent_shape)}")
        dim = n // tokens
    else:
        dim = p["dim"]
        if n % dim:
            raise UserError(f"preset {preset} cuts latents into tokens of d={dim}, which does not divide "
                            f"C*H*W = {n} {tuple(latent_shape)}: pass --tokens")
        tokens = n // dim
    return ReVQConfig(
        latent_shape=tuple(latent_shape), tokens=tokens, codes=codes if codes is not None else p["codes"], dim=dim,
        preset=preset, split=split or "channel", rectifier=rectifier or "vit",
        rectifier_form=rectifier_form or "residual",
        rectifier_width=rectifier_width if rectifier_width is not None else p["rectifier_width"],
        rectifier_layers=rectifier_layers if rectifier_layers is not None else p["rectifier_layers"],
        vae=vae, image_size=image_size,
    )


def resolve_train_config(
    preset: str,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    reset: bool = True,
    codebook_update: str = "auto",
    codebook_init: str = "random",
    flip: bool = False,
    device: torch.device | None = None,
) -> TrainConfig:
    """The training config for a preset, with the user's overrides.

    `codebook_update` "auto" picks "sparse" on CUDA, where codebooks are large and its momentum tails
    run compiled, and "dense" on the CPU, where the small codebooks of CPU runs make dense AdamW the
    cheaper of the two (they train the same: see codebook_optim.py).
    """
    p = _preset(preset)
    if codebook_update == "auto":
        codebook_update = "sparse" if device is not None and device.type == "cuda" else "dense"
    return TrainConfig(
        epochs=epochs if epochs is not None else p["epochs"],
        batch_size=batch_size if batch_size is not None else p["batch_size"],
        lr=lr if lr is not None else TrainConfig.lr, seed=seed, reset=reset, codebook_update=codebook_update,
        codebook_init=codebook_init, flip=flip,
    )


def check_codes_fit_data(config: ReVQConfig, n: int, store: str, *, from_preset: bool) -> None:
    """Refuse K codes per position that N latents cannot initialise (K > N), and warn where they
    would be memorised rather than learned (K > N/8: fewer than 8 latents per code), naming a fix:
    the tiny preset (with K = N/8 where its 128 codes are too many), or K = N/8 rounded down to a
    power of two."""
    k = config.codes
    if k <= n // MIN_LATENTS_PER_CODE:
        return
    sensible = 2 ** int(math.log2(n // MIN_LATENTS_PER_CODE)) if n >= MIN_LATENTS_PER_CODE else None
    tiny = PRESETS["tiny"]["codes"]
    fixes = []
    if from_preset and config.preset != "tiny" and sensible is not None:
        # the tiny preset's smaller rectifier and batch suit small stores too
        fixes.append(f"--preset tiny (K={tiny})" if sensible >= tiny else f"--preset tiny --codes {sensible}")
    if sensible is not None:
        fixes.append(f"--codes {sensible} (at most N/{MIN_LATENTS_PER_CODE})")
    fix = " or ".join(fixes) if fixes else f"a store of at least {MIN_LATENTS_PER_CODE * k} latents"
    what = f"K={k} codes per position" + (f" (preset {config.preset})" if from_preset else " (--codes)")
    if k > n:
        raise UserError(f"{what} need at least {k} latents to start from, and about {MIN_LATENTS_PER_CODE * k} "
                        f"not to memorise them, but {store} holds {n}: use {fix}")
    log.warning(f"warning: {what} for {n} latents, fewer than {MIN_LATENTS_PER_CODE} per code: the codebooks "
                f"may memorise the training latents; consider {fix}")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run dir's config.json as a dict (model fields, `data`, and `train` when `fit` wrote it)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a ReVQ run: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
