"""Output folders that a command owns as a whole (the demo's, the quality benchmark's).

A marker file proves that a folder was made by that command, so a re-run may clear it; any other
non-empty folder is refused rather than emptied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from revq_pipe.pipeline.errors import UserError


def claim_folder(out: Path, marker: str, command: str) -> None:
    """An empty folder at `out` for `command`: its own earlier folder is cleared, anything else refused."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        if any(out.iterdir()):
            if not (out / marker).is_file():
                raise UserError(f"--out {out} is not empty and was not made by `{command}`: choose another folder")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(json.dumps({"made_by": command}) + "\n")
