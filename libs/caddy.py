"""The part of Caddy's config the launcher and the network service's ingress share: what Caddy is
started with (on stdin, never a file), and what every config the ingress loads keeps."""

from __future__ import annotations

from typing import Any


def bootstrap_config(admin_listen: str) -> dict[str, Any]:
    """The admin endpoint (host:port), no persisted config (the network schema is the only
    record), and only warnings logged (each admin request is an INFO line otherwise)."""
    return {
        "admin": {"listen": admin_listen, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "WARN"}}},
    }
