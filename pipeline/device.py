"""Turning the CLI's --device / --dtype words into torch objects."""

import torch

from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.preflight import known_device


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"`device={name}` was asked for, but this machine has no CUDA device")
        return torch.device(name)
    known_device(name)  # anything but "cpu" is unknown here
    return torch.device("cpu")
