"""A folder of PNG images, one per key, written with the row stores' resume protocol.

`decode --vae` writes here. The manifest `decode.json` plays the part of a store's attrs: what the
images are decoded from, `rows_done` and `complete`, rewritten atomically after each chunk
(`commit`) and at the end (`finish`). Each PNG is written under a temp name and renamed, so a kill
never leaves a truncated image; a run again resumes at `rows_done`.

Before anything is written every key's file name is checked: inside the folder (pipeline/paths.py),
no two keys on one file, no name longer than the folder's file system allows.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from revq_pipe.pipeline.atomic_files import read_json, write_json
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.lease import contents
from revq_pipe.pipeline.paths import image_path, refuse_collisions

MANIFEST_NAME = "decode.json"
TEMP_SUFFIX = ".png.tmp"


class DecodedImages:
    """PNG images under `folder`, row i at `paths[i]`, and the manifest of how far they got."""

    def __init__(self, folder: Path, paths: list[Path], manifest: dict[str, Any]):
        self.folder, self.paths, self.manifest = folder, paths, manifest

    @classmethod
    def open_or_create(cls, folder: Path, keys: np.ndarray, identity: dict[str, Any],
                       overwrite: bool) -> "DecodedImages":
        """The folder for images of `keys` decoded from `identity` (what they are made from): one
        begun for the same identity is resumed; a folder holding anything else is refused unless
        `overwrite` (then images are written into it, replacing same-named files)."""
        paths = [image_path(folder, key) for key in keys]
        refuse_collisions([str(path) for path in paths], keys, "image file")
        _refuse_long_names(folder, paths, keys)
        _refuse_folders_out(folder, paths)
        manifest_path = folder / MANIFEST_NAME
        manifest = _read_manifest(manifest_path)
        if manifest is not None and manifest.get("identity") == identity and not overwrite:
            for stale in folder.rglob(f".*{TEMP_SUFFIX}"):  # an image a killed run was writing
                stale.unlink()
            return cls(folder, paths, manifest)
        there = contents(folder)
        began_only = there == [manifest_path] and manifest is not None and not manifest.get("rows_done")
        if there and not began_only and not overwrite:
            raise UserError(f"{folder} already holds files (or images decoded from other tokens): pass "
                            f"`overwrite=True` to write into it, or choose another `out`")
        images = cls(folder, paths, {"identity": identity, "count": len(paths), "rows_done": 0, "complete": False})
        images._save()
        return images

    @property
    def rows_done(self) -> int:
        return int(self.manifest["rows_done"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write(self, start: int, pixels: np.ndarray) -> None:
        """Write the images of rows [start, start + len(pixels)), each (H, W, 3) uint8."""
        for path, image in zip(self.paths[start:start + len(pixels)], pixels):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")  # short: any key's name fits
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)

    def commit(self, rows_done: int) -> None:
        self.manifest["rows_done"] = rows_done
        self._save()

    def finish(self) -> None:
        self.manifest.update(rows_done=len(self.paths), complete=True)
        self._save()

    def _save(self) -> None:
        write_json(self.folder / MANIFEST_NAME, self.manifest, indent=1)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    manifest = read_json(path)
    return manifest if isinstance(manifest, dict) and "rows_done" in manifest else None


def _refuse_folders_out(folder: Path, paths: list[Path]) -> None:
    """Refuse a sub-folder the images would go into that is a link leading out of `folder` (one
    planted there would receive PNGs anywhere the user may write)."""
    inside = folder.resolve()
    for parent in sorted({path.parent for path in paths}):
        if not parent.resolve().is_relative_to(inside):
            raise UserError(f"{parent} leads out of {folder} through a link: remove the link, or choose another `out`")


def _refuse_long_names(folder: Path, paths: list[Path], keys: np.ndarray) -> None:
    """Refuse a key whose file name or path is longer than the file system takes (ENAMETOOLONG
    halfway through a decode otherwise)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    path_max = os.pathconf(existing, "PC_PATH_MAX")
    for row, path in enumerate(paths):
        too_long = next((part for part in path.relative_to(folder).parts if len(os.fsencode(part)) > name_max), None)
        if too_long is not None or len(os.fsencode(str(path.absolute()))) >= path_max:
            what = (f"a file name of {len(os.fsencode(too_long))} bytes" if too_long is not None
                    else f"a path of {len(os.fsencode(str(path.absolute())))} bytes")
            key = str(keys[row])
            shown = repr(key) if len(key) <= 60 else repr(key[:60]) + "..."
            raise UserError(f"the key {shown} (row {row}) makes {what}, more than the file system of {folder} "
                            f"takes ({name_max} per name, {path_max} per path)")
