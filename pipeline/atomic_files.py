"""Small files that a kill must never leave torn: each is written to a temp file beside its place
and renamed over it, so a reader finds the old file or the new one (run dir files, manifests,
markers); and the JSON reading that goes with them, where a missing or torn file means "none".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_atomically(path: Path, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """`write(tmp)` to `path` + `suffix` beside it, then rename it over `path` (the suffix keeps a
    writer that picks its format from the extension, like matplotlib's, on the right one)."""
    tmp = path.with_name(path.name + suffix)
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, value: Any, *, indent: int | None = None) -> None:
    """`value` as JSON (and a final newline) at `path`, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=indent) + "\n"))


def read_json(path: Path) -> Any:
    """The JSON value at `path`, or None when it is missing or cannot be read as JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
