"""Fail fast without the Hugging Face hub instead of letting the libraries retry for ~50 s.

The probe runs before datasets/transformers are asked for a hub name. When the hub is out of
reach the libraries are switched to offline mode, so a dataset or tokenizer that is already in
the local HF cache still loads, and anything else fails at once with one clear line.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

from engine.errors import UserError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_reason() -> str | None:
    """None when the hub answers; else why not (the env switch, or the failed connection)."""
    if _env_offline():
        return "HF_HUB_OFFLINE=1"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"
    return None


def go_offline() -> None:
    """Make huggingface_hub/datasets/transformers use only their local caches from now on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], attr):
            setattr(sys.modules[module], attr, True)


def prepare_hub_access() -> str | None:
    """Probe once; returns the offline reason (after switching to offline mode) or None."""
    reason = offline_reason()
    if reason is not None:
        go_offline()
    return reason


def unreachable(what: str, name: str, reason: str, instead: str) -> UserError:
    return UserError(f"the Hugging Face hub is unreachable ({reason}) and {what} {name!r} is not in the local "
                     f"cache; use {instead}")
