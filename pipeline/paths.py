"""Where things live: on this machine or behind an fsspec URL. The one place that tells them apart.

Stores and sources are named by a local path (relative, absolute, `~`), a `file://` URL (both
local), or any other fsspec URL (`memory://`, `s3://`, `simplecache::...`: remote). fsspec's own
`url_to_fs` decides, so a name means here what it means to zarr and webdataset, which open it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from revq_pipe.pipeline.errors import UserError


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system behind `url` and the path on it; an unusable URL is a user error."""
    try:
        return fsspec.core.url_to_fs(str(url))
    # ValueError: a protocol fsspec does not know; ImportError: one whose package is not installed
    # ("Install s3fs to access S3").
    except (ValueError, ImportError) as err:
        raise UserError(f"cannot open {url}: {err}") from err


def local_path(url: str | Path) -> Path | None:
    """The path on this machine that `url` names, or None when it names a remote location.

    A plain path comes back as written (`~` expanded), so messages and reports show it as the
    user gave it; a `file://` URL as the absolute path it names.
    """
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        return None
    protocol, _ = fsspec.core.split_protocol(str(url))
    return Path(path) if protocol else Path(url).expanduser()


def absolute_url(url: str | Path) -> str:
    """Local locations as absolute paths with links resolved, remote URLs as they are: so records
    and comparisons of store locations hold from any working directory."""
    path = local_path(url)
    return str(path.resolve()) if path is not None else str(url)


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two names point at the same store (as `absolute_url` spells them, trailing / aside)."""
    return absolute_url(a).rstrip("/") == absolute_url(b).rstrip("/")


def exists(url: str | Path) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def image_path(folder: Path, key: str) -> Path:
    """Where the image file for a store key goes: the key's relative path with a .png extension,
    kept inside `folder` (no absolute parts, no `..`)."""
    parts = [part for part in PurePosixPath(str(key)).with_suffix(".png").parts if part not in ("/", "..", ".")]
    return folder.joinpath(*parts)
