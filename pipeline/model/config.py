"""Presets, the model's config (`ReVQConfig`), and how a user sets a config field (`setting`).

`ReVQConfig` is everything needed to rebuild the model; `ReVQ.save_pretrained` writes it as the run
dir's `config.json` (flat, diffusers-style). It describes the architecture only (and names the VAE
when that is a hub id or the embedded one), so a published run carries no local paths: where the
training data came from and how `fit` trained (pipeline/train/config.py) live in the run's training
record (pipeline/train/training_record.py). Impossible combinations raise `UserError` here, before
any work starts.

Fields a user may set carry a `Setting` in their metadata: its help, choices and bounds. The CLI
builds one option per such field from it (cli.py), and `FitConfig` accepts exactly these names, so
a new fit setting is one field with its `setting(...)` here or in pipeline/train/config.py. The
other stages' settings are `StageConfig`s made the same way: `EncodeConfig`
(pipeline/images/encode_config.py) and `ExportConfig` (pipeline/storage/export_formats.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.model.rectifier import RECTIFIERS

if TYPE_CHECKING:
    import torch

SPLITS = ("channel", "spatial")
# residual: g(q) = q + f(q) with f's last layer zero at initialisation, so the rectifier starts as the
# identity and can only improve on the bare quantizer; paper: the released code's g(q) = f(q).
RECTIFIER_FORMS = ("residual", "paper")

# The paper's released configs: code dim d and codes K per token position, rectifier width x layers,
# batch size; T follows from the latent shape (C*H*W / d). `tiny` is sized for CPU demos and tests
# on latents like (16, 8, 8) or (32, 8, 8) from small VAEs: it trains in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "512T_NC=16384": dict(dim=4, codes=16384, rectifier_width=512, rectifier_layers=3, batch_size=256, epochs=100),
    "256T_NC=65536": dict(dim=8, codes=65536, rectifier_width=1024, rectifier_layers=4, batch_size=256, epochs=100),
    "256T_NC=262144": dict(dim=8, codes=262144, rectifier_width=512, rectifier_layers=4, batch_size=128, epochs=100),
    "tiny": dict(dim=4, codes=128, rectifier_width=64, rectifier_layers=2, batch_size=64, epochs=20),
}


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


def preset_values(name: str) -> dict[str, Any]:
    """A preset's values (d, K, rectifier size, batch, epochs); `UserError` naming the presets for an unknown one."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# The words of the --overwrite option, which every command that writes an output has.
OVERWRITE_HELP = "Replace an existing output made otherwise instead of refusing."


@dataclass(frozen=True)
class Setting:
    """How a user sets one config field: the help of its CLI option, and what it accepts.

    `from_preset`: its default is the preset's value of the same name (the help lists them);
    `shown_default`: the default as the help states it, where it is not the field's own;
    `flag`: an option without a value that sets the field to `flag_sets` (`--no-reset` sets False,
    `--flip` True); other settings are `--<name>` with a value. `validate`: refuses a bad value in
    its own words, where the choices' words do not fit (a device, `cuda:1` included; an export
    format); the choices then only name the values in the help. `name`, `type` (without None) and
    `default` are the field's, filled in by `settings_of`.
    """

    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    minimum: int | float | None = None
    from_preset: bool = False
    shown_default: str | None = None
    flag: str | None = None
    flag_sets: bool = False
    validate: Callable[[Any], Any] | None = None
    name: str = ""
    type: Any = None
    default: Any = None

    @property
    def option(self) -> str:
        """The CLI option's name."""
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """Refuse a value outside the choices or below the minimum, naming the setting."""
        if self.validate is not None:
            self.validate(value)
        elif self.choices and value not in self.choices:
            raise UserError(f"unknown {self.name.replace('_', ' ')} {value!r}: use one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"`{self.name}` must be at least {self.minimum}, not {value}")


def setting(help: str, default: Any = MISSING, **how: Any) -> Any:
    """A dataclass field a user may set, with its `Setting` (see there) in the field's metadata."""
    return field(default=default, metadata={"setting": Setting(help, **how)})


def switch(help: str, flag: str) -> Any:
    """A setting that is False unless its option `flag`, which takes no value, is given."""
    return setting(help, False, flag=flag, flag_sets=True)


def settings_of(cls: type) -> dict[str, Setting]:
    """The user-settable fields of dataclass `cls`, in field order, each `Setting` knowing its
    field's name, value type (without `None`) and default."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if "setting" in f.metadata:
            kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            default = None if f.default is MISSING else f.default
            found[f.name] = dataclasses.replace(f.metadata["setting"], name=f.name, type=kind, default=default)
    return found


class StageConfig:
    """Base of a stage's settings as one frozen dataclass (`EncodeConfig`, `ExportConfig`): the fields
    a user sets carry their `Setting`, from which the CLI makes the stage's options, and a config
    refuses a bad value when it is made, naming the field (`UserError`). The stage function takes one
    as `config=`, or its fields as keywords (`given`)."""

    stage: ClassVar[str]  # the stage function's name, for messages

    def __post_init__(self) -> None:
        for name, how in settings_of(type(self)).items():
            value = getattr(self, name)
            if value is not None:  # None: the stage's default (e.g. the VAE's own image size)
                how.check(value)

    @classmethod
    def given(cls, config: StageConfig | None = None, **options: Any) -> Any:
        """`config` (default: every field's default) with `options` set by field name, theirs winning:
        what the stage function was called with. A name that is no field is refused, naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            raise UserError(f"unknown {cls.stage} setting {unknown[0]!r}: choose from {', '.join(names)}")
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise UserError(f"`config` must be a {cls.__name__}, not {type(config).__name__}")
        return dataclasses.replace(config, **options)


@dataclass
class ReVQConfig:
    """The model: preprocessor, splitter, grouped quantizer (T codebooks of K codes of dim d), rectifier.

    `vae` names the VAE whose latents the model tokenizes, when that name means the same on any
    machine (a Hugging Face id or `revq-pipe-embedded`; None for a local folder or a model built by
    hand), and `image_size` the square size its latents were encoded at: what the image API
    (`ReVQ.tokenize_images`) and the model card need.
    """

    latent_shape: tuple[int, int, int]
    tokens: int = setting("Tokens per image T, off-preset (d becomes C*H*W/T)", metavar="T", minimum=1,
                          shown_default="C*H*W / the preset's d")
    codes: int = setting("Codes per token position K, off-preset", metavar="K", minimum=1, from_preset=True)
    dim: int
    preset: str = "custom"
    split: str = setting("Ablation: how latents are cut into tokens", "channel", choices=SPLITS)
    rectifier: str = setting("Ablation: the rectifier network", "vit", choices=RECTIFIERS)
    rectifier_form: str = setting("residual (g(q) = q + f(q), the identity at initialisation) or paper (g(q) = f(q), "
                                  "as the paper's code)", "residual", choices=RECTIFIER_FORMS)
    rectifier_width: int = setting("Rectifier width", 64, metavar="W", minimum=1, from_preset=True)
    rectifier_layers: int = setting("Rectifier blocks", 2, metavar="L", minimum=0, from_preset=True)
    attention_head_dim: int = setting("Channels per attention head of the vit rectifier (its width must be a "
                                      "multiple)", 32, metavar="D", minimum=1)
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


def resolve_model_config(preset: str, latent_shape: tuple[int, int, int], *, vae: str | None = None,
                         image_size: int | None = None, **overrides: Any) -> ReVQConfig:
    """The model config for a preset on latents of `latent_shape`, with the user's `overrides` of
    any setting of `ReVQConfig` (`settings_of`).

    The preset fixes d, K and the rectifier's width x layers; T = C*H*W / d unless `tokens` is given,
    in which case d = C*H*W / T.
    """
    p = preset_values(preset)
    settings = settings_of(ReVQConfig)
    values = {name: p[name] if s.from_preset else s.default for name, s in settings.items()}
    values.update({name: value for name, value in overrides.items() if value is not None})
    n = math.prod(latent_shape)
    tokens = values.pop("tokens")
    if tokens is not None:
        if tokens < 1 or n % tokens:
            raise UserError(f"`tokens={tokens}` does not divide the latent's C*H*W = {n} numbers {tuple(latent_shape)}")
        dim = n // tokens
    else:
        dim = p["dim"]
        if n % dim:
            raise UserError(f"preset {preset} cuts latents into tokens of d={dim}, which does not divide "
                            f"C*H*W = {n} {tuple(latent_shape)}: pass `tokens`")
        tokens = n // dim
    return ReVQConfig(latent_shape=tuple(latent_shape), tokens=tokens, dim=dim, preset=preset, vae=vae,
                      image_size=image_size, **values)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run dir's config.json as a dict (model fields, `data`, and `train` when `fit` wrote it)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a ReVQ run: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
