"""Latents other tools saved, read as arrays: what `revq-pipe import-latents` turns into a store.

One file holds an (N, C, H, W) float array and, optionally, its labels (N,) and keys (N,):
- `.pth` / `.pt`: a tensor (as the ReVQ paper's code saves its latents), or a dict of tensors/lists
  with `latents` and optional `labels`, `keys`. Read with `torch.load(weights_only=True)`, so a
  file cannot run code on load.
- `.npy`: the array alone (memory-mapped, so big files are read a chunk at a time).
- `.npz`: arrays `latents` (or a single unnamed `arr_0`) and optional `labels`, `keys`.
- `.safetensors`: tensors `latents` and optional `labels` (the format holds no strings, so no keys).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from revq_pipe.pipeline.errors import UserError

SUFFIXES = (".pth", ".pt", ".npy", ".npz", ".safetensors")
LATENT_NAMES = ("latents", "arr_0")


@dataclass
class LatentFile:
    """The arrays of one file; `labels`/`keys` are None when the file has none."""

    path: Path
    latents: Any  # (N, C, H, W) float array (np.ndarray or a read-only memory map)
    labels: np.ndarray | None
    keys: np.ndarray | None

    def __len__(self) -> int:
        return len(self.latents)


def read_latent_file(path: str | Path) -> LatentFile:
    """Read one file of latents (see the module docstring); anything else is a UserError naming it."""
    path = latent_file_path(path)
    suffix = path.suffix.lower()
    try:
        arrays = _READERS[suffix](path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: say which, in one line
        raise UserError(f"{path} cannot be read as {suffix} latents: {str(err).splitlines()[0]}") from err
    return _checked(path, arrays)


def latent_file_path(path: str | Path) -> Path:
    """`path` (`~` expanded) when it is a file of a kind read here, else a UserError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"latent file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown latent file type {suffix or '(none)'}: use {', '.join(SUFFIXES)}")
    return path


def _read_torch(path: Path) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} holds objects other than tensors, which torch.load(weights_only=True) does not "
                        f"build (a file can run code on load otherwise): save the tensors alone, or .npy/.safetensors "
                        f"({str(err).splitlines()[-1].strip()[:120]})") from err
    if isinstance(loaded, torch.Tensor):
        loaded = {"latents": loaded}
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a tensor or a dict with `latents`")
    return {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in loaded.items()}


def _read_npy(path: Path) -> dict[str, Any]:
    return {"latents": np.load(path, mmap_mode="r", allow_pickle=False)}


def _read_npz(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return load_file(str(path))


_READERS = {".pth": _read_torch, ".pt": _read_torch, ".npy": _read_npy, ".npz": _read_npz,
            ".safetensors": _read_safetensors}


def _checked(path: Path, arrays: dict[str, Any]) -> LatentFile:
    name = next((n for n in LATENT_NAMES if n in arrays), None)
    if name is None:
        raise UserError(f"{path} has no `latents` array (it has {', '.join(sorted(arrays)) or 'nothing'})")
    latents = arrays[name]
    if getattr(latents, "ndim", 0) != 4 or not np.issubdtype(latents.dtype, np.floating):
        raise UserError(f"{path}: latents must be a float (N, C, H, W) array, not {latents.dtype} "
                        f"{tuple(getattr(latents, 'shape', ()))}")
    if min(latents.shape[1:]) < 1:
        raise UserError(f"{path}: latents of shape {tuple(latents.shape)} have an empty dimension: a latent "
                        f"needs C, H and W of at least 1")
    n = len(latents)
    labels = arrays.get("labels")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: labels must be N={n} integers, not {labels.dtype} {labels.shape}")
        refuse_bad_labels(labels, str(path))
    keys = arrays.get("keys")
    if keys is not None:
        keys = np.asarray(keys, dtype=str)
        if keys.shape != (n,):
            raise UserError(f"{path}: keys must be N={n} strings, not shape {keys.shape}")
    return LatentFile(path, latents, labels, keys)


def refuse_bad_labels(labels: np.ndarray, where: str) -> None:
    """The rule for labels from every source: -1 (unknown) or a class number that an int64 holds.
    Anything else (a value past int64, another negative number) is refused, naming the first."""
    bad = labels > np.iinfo(np.int64).max if labels.dtype.kind == "u" else labels < -1
    if np.any(bad):
        row = int(np.argmax(bad))
        raise UserError(f"{where}: label {labels[row]} (row {row}) is neither -1 (unknown) nor a class number from "
                        f"0 to 2^63-1")
