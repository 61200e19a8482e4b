"""Whether the Hugging Face hub can be reached, asked once and quickly, before anything waits on it.

transformers retries an unreachable hub for about half a minute before it gives up with the hub's own message; one
HEAD request with a short timeout tells the same in seconds, so that export-gpt2 can say what to do instead.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE_VALUES = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    """The hub's address: HF_ENDPOINT when set (a mirror), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_offline_by_choice() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks never to contact the hub."""
    return any(os.environ.get(name, "").lower() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """True when the hub answers an HTTP request within `timeout` seconds (any status: it is there); asked once
    per process."""
    if hub_offline_by_choice():
        return False
    request = urllib.request.Request(hub_endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse the bare address
    except (OSError, ValueError):  # no route, no name, a timeout, or a malformed HF_ENDPOINT
        return False


if __name__ == "__main__":  # `python -m gpt2onnx.export.hub`: exit 0 when the hub can be reached (run.sh asks)
    raise SystemExit(0 if hub_reachable() else 1)
