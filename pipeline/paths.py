"""Where things live: on this machine or behind an fsspec URL. The one place that tells them apart.

Stores and sources are named by a local path (relative, absolute, `~`), a `file://` URL (both
local), or any other fsspec URL (`memory://`, `s3://`, `simplecache::...`: remote). fsspec's own
`url_to_fs` decides, so a name means here what it means to zarr and webdataset, which open it.
"""

from __future__ import annotations

import re
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


def inside_parts(key: str) -> tuple[str, ...]:
    """The parts of a key read as a relative path that stay inside a folder: no root (`/`, `//`),
    no `..`, no `.`, no empty parts, and `\\` read as a separator too (it is one where Windows
    extracts a tar). Keys come from data (a webdataset's __key__ can be anything), so every file or
    tar member named after a key goes through here."""
    return tuple(part for part in re.split(r"[/\\]", str(key)) if part not in ("", ".", ".."))


def image_path(folder: Path, key: str) -> Path:
    """Where the image file for a store key goes: the key's relative path with a .png extension,
    kept inside `folder` (no absolute parts, no `..`)."""
    parts = inside_parts(key)
    if not parts:
        raise UserError(f"the key {key!r} names no file inside a folder")
    return folder.joinpath(*parts[:-1], PurePosixPath(parts[-1]).with_suffix(".png").name)


def refuse_collisions(names: list[str], keys, what: str) -> None:
    """Refuse two keys that become the same `what` (file or member name), e.g. `dup/x` and
    `../dup/x`: writing both would silently keep one."""
    first: dict[str, int] = {}
    for row, name in enumerate(names):
        earlier = first.setdefault(name, row)
        if earlier != row:
            raise UserError(f"the keys {str(keys[earlier])!r} (row {earlier}) and {str(keys[row])!r} (row {row}) "
                            f"both become the {what} {name!r}: make the keys distinct")
