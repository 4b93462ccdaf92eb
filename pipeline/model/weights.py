"""A run's weights are used only when they are what `fit` wrote.

`save_pretrained` records the sha256 of model.safetensors in config.json (`_weights_sha256`), and
`load_verified` checks it before loading: bytes changed anywhere in the file (a bad copy, a
damaged disk) are refused, even where the header still parses and the values look plausible. A
file that safetensors cannot read (truncated, a corrupt header) and weights that are NaN or inf
are refused too, with the file named and a way out; runs written before the checksum get the
last two checks.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from revq_pipe.pipeline.errors import UserError

# Underscored, as diffusers marks config.json keys that are not architecture (`_class_name`).
CHECKSUM_KEY = "_weights_sha256"
_WAY_OUT = "restore it, or write it again from the run's checkpoint: run the same fit with `resume=True`"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_verified(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, after checking them against the checksum the
    run recorded (when it did), that the file parses, and that every float is finite."""
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise UserError(f"{path} is not the file fit wrote (its sha256 differs from config.json's "
                        f"{CHECKSUM_KEY}): it was damaged or replaced; {_WAY_OUT}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} cannot be read as safetensors ({reason}): it is damaged or truncated; "
                        f"{_WAY_OUT}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path} holds NaN or inf in {name}: {_WAY_OUT}")
    return state


def read_config_file(path: Path) -> dict[str, Any]:
    """A run's config.json as a dict: a file that is not a JSON object (damaged, or edited by hand
    into something else) is refused with its reason, before anything is built from it."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} cannot be read as a run's config: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a JSON {type(values).__name__}, not the object of a run's config")
    return values


def checked_model_config(values: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: Path | str):
    """The ReVQConfig that config.json's `values` describe, refused unless every field has its type
    and the model it describes has exactly the tensors of the weights (`shapes`, by name): checked
    before anything of the model's size is allocated, so a config edited to absurd sizes ends in
    one line instead of an allocation of terabytes."""
    from revq_pipe.pipeline.model.config import ReVQConfig

    hints = typing.get_type_hints(ReVQConfig)
    for name, value in values.items():
        if name in hints and not _has_type(value, hints[name]):
            raise UserError(f"{where}: {name} must be {_type_words(hints[name])}, not {json.dumps(value)[:40]}")
    config = ReVQConfig.from_dict(values)
    check_config_fits(config, shapes, where)
    return config


def check_config_fits(config, shapes: dict[str, tuple[int, ...]], where: Path | str) -> None:
    """Refuse a model config whose tensors would not have the `shapes` of the weights meant for it
    (preprocessor statistics may be absent: they can come from elsewhere). The model is built on the
    meta device, which allocates no memory whatever the config's sizes."""
    from revq_pipe.pipeline.model.revq import ReVQ

    if config.rectifier != "none" and config.rectifier_layers > len(shapes):  # each layer has weights
        raise UserError(f"{where}: the config's {config.rectifier_layers} rectifier layers are not in the weights "
                        f"({len(shapes)} tensors in all)")
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in ReVQ(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes and not name.startswith("preprocessor."):
            raise UserError(f"{where}: the config's model has {name} {list(shape)}, which the weights lack")
        if name in shapes and tuple(shapes[name]) != shape:
            raise UserError(f"{where}: the config makes {name} {list(shape)}, but the weights hold "
                            f"{list(shapes[name])}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UserError(f"{where}: the weights hold {unexpected[0]}, which the config's model lacks")


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint of the config (int, str, None, unions, fixed tuples)."""
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, type(None)):
        return isinstance(value, hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_has_type(v, arg) for v, arg in zip(value, args)))
    return True


def _type_words(hint: Any) -> str:
    """A type hint of the config in words: "an integer or null", "a list of 3 integers"."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} {'integers' if set(args) == {int} else 'values'}"
    if args:
        return " or ".join(_type_words(arg) for arg in args)
    return {int: "an integer", str: "text", type(None): "null"}.get(hint, str(hint))
