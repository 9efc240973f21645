"""gRPC clients between processes: one traced channel per target (`libs.telemetry.TracedChannel`),
signed principals per call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from libs import budget
from libs import principal as principals
from libs.settings import SERVICES, Settings
from libs.telemetry import TracedChannel


class Signer:
    """Attaches a signed principal to outgoing calls."""

    def __init__(self, secret: bytes, service: str):
        self._secret = secret
        self._system = principals.system_principal(service)

    def metadata(self, p: principals.Principal | None = None) -> list[tuple[str, str | bytes]]:
        return principals.sign(p if p is not None else self._system, self._secret)

    def system(self) -> list[tuple[str, str | bytes]]:
        return principals.sign(self._system, self._secret)


# gRPC's default reconnect backoff (1 s, growing 1.6x to 120 s) keeps a caller refusing calls for
# seconds after a restarted service is back (kill -9 of accounts: databases answered 503 for up
# to 2.6 s after accounts served again); the launcher restarts a service within a second or two,
# so callers try to reconnect at least every second.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


T = TypeVar("T")


class Channels:
    """Lazily opened channels to the five services, shared by a process, and what the clients
    on them share (`shared`: the tenant cache every AccountsPeer of the process reads)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._shared: dict[str, Any] = {}

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """The one object under `key` for this process, made on first use; closed (its
        `aclose()`, when it has one) with the channels."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value

    def get(self, service: str) -> grpc.aio.Channel:
        if service not in SERVICES:
            raise KeyError(service)
        ch = self._channels.get(service)
        if ch is None:
            ch = TracedChannel(
                grpc.aio.insecure_channel(self.settings.service_target(service), options=RECONNECT_OPTIONS),
                on_call=budget.count_peer_call,
            )
            self._channels[service] = ch
        return ch

    async def close(self) -> None:
        for value in self._shared.values():
            aclose = getattr(value, "aclose", None)
            if aclose is not None:
                await aclose()
        self._shared.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
