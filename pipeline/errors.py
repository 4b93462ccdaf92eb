"""The one exception type that means "the user asked for something impossible", the file system
failures that mean the same, how a message names the parameters it is about, and how a refusal
names what differs between an existing output and the one asked for."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from typing import Any, Iterable, Mapping


class UserError(ValueError):
    """Bad usage or bad input.

    A `ValueError`, so library callers can catch it as one; the CLI prints the message as one line
    on stderr and exits with status 2. Raise it only for problems the user can fix (a missing
    path, a mismatched store, an impossible config), never for bugs.

    A message names the parameters it is about as a Python caller passes them, in backquotes and
    with the value where it matters: "`image_size=7` is not a multiple of 32", "pass
    `overwrite=True`", "`out` must not be the latent store". The CLI shows its own flags in their
    place (`as_command_line`): "--image-size 7", "--overwrite", "--out".
    """


# A backquoted parameter of a message: `name` or `name=value`.
PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def as_command_line(message: str, flags: Mapping[str, tuple[str, bool]]) -> str:
    """`message` as a command line user reads it: each backquoted parameter that `flags` knows
    (name -> (flag or metavar, whether it is an on/off flag)) becomes that flag, with its value
    ("`image_size=7`" -> "--image-size 7", "`overwrite=True`" -> "--overwrite", "`store=x`" ->
    "STORE x"); anything else stays as written."""

    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in flags:
            return match.group(0)
        shown, on_off = flags[name]
        if value is None or (on_off and value == "True"):
            return shown
        return match.group(0) if on_off else f"{shown} {value}"

    return PARAMETER.sub(flag, message)


# Failures of the file system that the user fixes (permissions, a read-only or full disk, a path
# through a file, a name too long): the CLI reports them as bad input, not as a crash.
USER_FIXABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                                 errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT})


def os_error_line(err: OSError) -> str | None:
    """One line for a user-fixable file system failure (None for others): what failed, and where."""
    if err.errno not in USER_FIXABLE_ERRNOS:
        return None
    where = f": {err.filename}" if err.filename else ""
    advice = "; free some space and run the same command again" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{err.strerror or err}{where}{advice}"


SHOWN_FIELDS = 3  # a refusal names at most this many differing fields


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
