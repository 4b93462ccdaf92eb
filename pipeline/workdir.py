"""Output folders that a command owns as a whole (the demo's, the quality benchmark's).

A marker file proves that a folder was made by that command, so a re-run may clear it, or go on
from it when the marker records the same arguments; any other non-empty folder is refused rather
than emptied.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from revq_pipe.pipeline.atomic_files import read_json, write_json
from revq_pipe.pipeline.errors import UserError

# The marker files that prove a folder is the demo's, or the quality benchmark's.
DEMO_MARKER = "revq-demo.json"
QUALITY_MARKER = "revq-bench-quality.json"


def claim_folder(out: Path, marker: str, command: str, arguments: dict[str, Any] | None = None) -> bool:
    """An output folder at `out` for `command`. A folder this command made with the same `arguments`
    is kept, so an interrupted run goes on from what it finished (returns True); its own folder of
    other arguments is cleared; any other non-empty folder is refused."""
    record = {"made_by": command, **({"arguments": arguments} if arguments is not None else {})}
    check_claimable(out, marker, command)
    if out.exists() and any(out.iterdir()):
        if arguments is not None and read_json(out / marker) == record:
            return True
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / marker, record)
    return False


def check_claimable(out: Path, marker: str, command: str) -> None:
    """Refuse an `out` that `command` may not take: a file, or a folder of files it did not make."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"`out={out}` is a file, not a folder")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise UserError(f"`out={out}` is not empty and was not made by `{command}`: choose another folder")
