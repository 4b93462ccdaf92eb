"""How a refusal names what differs between an existing output and the one asked for: the fields
whose values differ, each with its value there and now (`image_size: 32 there, 64 now`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

SHOWN_FIELDS = 3  # a message names at most this many


def differences(there: Mapping[str, Any] | None, now: Mapping[str, Any], fields: Iterable[str] | None = None) -> str:
    """`field: <value there> there, <value now> now` for the first few of `fields` (default: every
    field of `now`) that differ, joined by "; " ("" when none does)."""
    there = there or {}
    changed = [field for field in (now if fields is None else fields) if there.get(field) != now.get(field)]
    return "; ".join(f"{field}: {_short(there.get(field))} there, {_short(now.get(field))} now"
                     for field in changed[:SHOWN_FIELDS])


def _short(value: Any) -> str:
    """`value` in at most about 60 characters: a long dict as its digest, a long text with its middle
    left out (the ends of a path or a hash are what tell two apart)."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    if isinstance(value, dict) and len(text) > 60:
        return "source " + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text if len(text) <= 60 else f"{text[:20]}...{text[-37:]}"
