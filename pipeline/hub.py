"""The Hugging Face hub as every part that reads from or writes to it sees it: whether it is switched
off (HF_HUB_OFFLINE) or out of reach, what a hub id looks like, and one-line reasons for its failures.

Nothing here waits on the network when it need not: `hub_unreachable` is one TCP connect with a
short timeout, so callers can go to the cache alone (or stop with a clear line) instead of the hub
client's retries, which spend half a minute per file on a machine without a network.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from revq_pipe.pipeline.errors import UserError

HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. One TCP connect with a short timeout: the hub
    client's own retries would otherwise spend half a minute per file on a machine offline."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or type(err).__name__}"
    return None


def looks_like_hub_id(spec: str) -> bool:
    """Whether `spec` has the form of a Hugging Face model id, owner/name."""
    parts = spec.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") and " " not in p for p in parts)


def cache_only() -> bool:
    """Whether a download should read the local cache alone: the hub is out of reach, though not
    switched off (where switched off, the hub client reads the cache alone by itself)."""
    return not hub_offline() and hub_unreachable() is not None


def lookup_failure(err: Exception) -> str:
    """Why a model could not be found on the hub or in its cache, in one line. A model missing
    from the cache is said in our words: the hub client's own line advises setting
    'local_files_only', which the user never set (`cache_only` did)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError):
        if hub_offline():
            return "it is not in the Hugging Face cache, and the hub is switched off (HF_HUB_OFFLINE)"
        unreachable = hub_unreachable()
        if unreachable:
            return f"it is not in the Hugging Face cache, and the hub cannot be reached ({unreachable})"
        return "it is not in the Hugging Face cache, and the hub did not send it"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def require_hub(action: str) -> None:
    """Refuse `action` (e.g. "push user/repo") in one line when the hub is switched off or out of reach."""
    if hub_offline():
        raise UserError(f"cannot {action}: the Hugging Face hub is switched off (HF_HUB_OFFLINE); unset it "
                        "and try again")
    unreachable = hub_unreachable()
    if unreachable:
        raise UserError(f"cannot {action}: the Hugging Face hub cannot be reached ({unreachable}); check the "
                        "network connection (or a proxy, or HF_ENDPOINT) and try again")
