"""Caddy's admin API, the only way ctrlmesh configures Caddy: GET /config/ to read what it holds,
POST /load to replace the whole config at once (Caddy applies it atomically and keeps the old
one if the new one fails to start)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx


class CaddyError(Exception):
    """Caddy refused a config or did not answer; the message is safe to log."""


class CaddyAdmin:
    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        # No kept-alive connections: a /load that touches the admin section makes Caddy restart
        # its admin server, which closes idle connections, and the next request would go out on
        # a dead one (ReadError). A fresh loopback connection per call costs nothing here.
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0)
        )

    @property
    def listen(self) -> str:
        """The admin endpoint as Caddy's `admin.listen` names it (host:port)."""
        parts = urlsplit(self.base_url)
        return f"{parts.hostname}:{parts.port or 2019}"

    async def config(self) -> Any:
        try:
            try:
                r = await self._client.get("/config/")
            except httpx.TransportError:  # the admin server restarting under a load: ask again
                r = await self._client.get("/config/")
        except httpx.HTTPError as err:
            raise CaddyError(
                f"Caddy's admin API at {self.base_url} does not answer ({type(err).__name__})"
            ) from err
        if r.status_code != 200:
            raise CaddyError(f"GET /config/ answered {r.status_code}")
        return r.json()

    async def load(self, config: dict[str, Any]) -> None:
        try:
            r = await self._client.post("/load", json=config)
        except httpx.HTTPError as err:
            raise CaddyError(
                f"Caddy's admin API at {self.base_url} does not answer ({type(err).__name__})"
            ) from err
        if r.status_code != 200:
            raise CaddyError(f"POST /load answered {r.status_code}: {r.text[:500]}")

    async def close(self) -> None:
        await self._client.aclose()
