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
from pathlib import Path

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
