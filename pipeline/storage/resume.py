"""What `encode` does with whatever is at its output: start afresh, resume, refuse, or replace.

A latent store made with the same settings (their sha256 fingerprint: VAE, image size, dtype,
compute precision, preprocessing, source listing) is resumed where its writer last committed, or
left as it is when complete; one made with other settings is refused unless --overwrite.
--overwrite replaces a Zarr store, never an unrelated local folder. A store begun and killed before
its first chunk was committed holds nothing to resume: it is replaced without --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from revq_pipe.pipeline.errors import UserError, differences
from revq_pipe.pipeline.preflight import store_output
from revq_pipe.pipeline.storage.latent_writer import WriteProgress
from revq_pipe.pipeline.storage.store import LatentStore, vacant

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """The decision about the output: a store to go on with (complete: nothing to do), or a new
    store to create, replacing what is there when `replace`."""

    store: LatentStore | None = None
    replace: bool = False
    progress: WriteProgress = field(default_factory=WriteProgress)


def fingerprinted(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with their sha256 added as `settings_sha256`: what a store must match to be resumed."""
    return {**settings, "settings_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()}


def plan_resume(out: str, settings: dict[str, Any], overwrite: bool) -> Resume:
    """Decide what to do with whatever is at `out`, for a store of `fingerprinted` settings."""
    if vacant(out):  # nothing there, or a store begun and killed before its first row
        return Resume(replace=True)
    store_output(out)
    try:
        existing = LatentStore.open(out, mode="r+", allow_incomplete=True)
    except UserError:
        if not overwrite:
            raise UserError(f"{out} is a Zarr store but not a latent store: pass `overwrite=True` to replace it") from None
        return Resume(replace=True)
    if overwrite:
        return Resume(replace=True)
    old = existing.attrs
    if old.get("settings_sha256") != settings["settings_sha256"]:
        details = differences(old, settings, [k for k in settings if k != "settings_sha256"]) or \
            "no settings fingerprint there"
        raise UserError(f"{out} was made with other settings ({details}): pass `overwrite=True` to replace it, "
                        f"or choose another `out`")
    if existing.complete:
        return Resume(store=existing)
    progress = WriteProgress.of(existing)
    log.warning(f"resuming {out}: {progress.rows} latents already stored")
    return Resume(store=existing, progress=progress)
