"""The --device words: which there are (checked before torch loads), and the torch device each names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from revq_pipe.pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
DEVICE_HELP = "Where to compute: auto (CUDA when available), cpu or cuda"


def known_device(device: object) -> None:
    """`device` names a kind of device there is (whether this machine has it is the stage's check)."""
    if isinstance(device, str) and device not in DEVICES and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a user error. A
    torch device (a Python caller's) is taken as it is."""
    import torch  # here, not above: the configs check --device with this module before torch loads

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"`device={name}` was asked for, but this machine has no CUDA device")
        return torch.device(name)
    known_device(name)  # anything but "cpu" is unknown here
    return torch.device("cpu")
