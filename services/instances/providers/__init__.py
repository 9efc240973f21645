"""The provider registry: providers by registry key, each registered once its engine answers.

`CTRLMESH_PROVIDERS` (default `docker`) names the keys to try; `DOCKER_HOST` (or
`CTRLMESH_DOCKER_HOST`) points both Docker-based providers at an engine. A provider whose engine
is not there at start is probed again on every probe interval and registered when it answers;
an instance keeps the key it was created with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from libs.errors import InvalidArgument, ProviderUnavailable
from libs.settings import Settings
from services.instances.providers.base import Provider, ProviderError
from services.instances.providers.docker import DockerProvider
from services.instances.providers.swarm import SwarmProvider

log = logging.getLogger("ctrlmesh.instances.providers")

FACTORIES = {"docker": DockerProvider, "swarm": SwarmProvider}


@dataclass
class Health:
    healthy: bool
    message: str
    latency_ms: float


class Registry:
    def __init__(self, settings: Settings, *, candidates: dict[str, Provider] | None = None):
        """`candidates` replaces the engines CTRLMESH_PROVIDERS names (tests' stand-ins)."""
        wanted = [n.strip() for n in settings.providers.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in FACTORIES]
        if unknown:
            log.warning("ignoring unknown providers in CTRLMESH_PROVIDERS: %s", ", ".join(unknown))
        self.configured = [n for n in wanted if n in FACTORIES]
        self._candidates: dict[str, Provider] = candidates or {
            n: FACTORIES[n](
                settings.docker_host,
                pull=settings.docker_pull,
                stop_timeout=settings.instance_stop_timeout.total_seconds(),
                name=n,
                secrets_dir=settings.secrets_runtime_dir,
            )
            for n in self.configured
        }
        self._registered: dict[str, Provider] = {}
        self.health: dict[str, Health] = {}
        self._default = settings.default_provider
        # What the log last said of each provider: probes run every few seconds (and on each
        # GET of the providers), so only a change is worth a line.
        self._reported: dict[str, tuple[bool, str]] = {}

    async def probe(self) -> dict[str, Health]:
        """Ping every configured engine; register the ones that answer for the first time."""
        for name, p in self._candidates.items():
            started = time.perf_counter()
            try:
                await p.ping()
                ok, msg = True, "ok"
            except ProviderError as err:
                ok, msg = False, str(err)
            self.health[name] = Health(ok, msg, round((time.perf_counter() - started) * 1000, 2))
            was_registered = name in self._registered
            if ok and not was_registered:
                self._registered[name] = p
            self._report(name, ok, msg, was_registered)
        return dict(self.health)

    def _report(self, name: str, ok: bool, msg: str, was_registered: bool) -> None:
        """Log a provider's state when it differs from what was last logged of it."""
        if self._reported.get(name) == (ok, msg):
            return
        self._reported[name] = (ok, msg)
        if ok and not was_registered:
            log.info("provider %s registered", name)
        elif ok:
            log.info("provider %s answers again", name)
        elif not was_registered:
            log.info("provider %s not registered: %s", name, msg)
        else:
            log.warning("provider %s does not answer: %s", name, msg)

    @property
    def names(self) -> list[str]:
        return [n for n in self.configured if n in self._registered]

    def default_name(self) -> str:
        if self._default and self._default in self._registered:
            return self._default
        if self.names:
            return self.names[0]
        raise ProviderUnavailable(
            "no instance provider is available", details={"providers": ",".join(self.configured)}
        )

    def resolve(self, name: str) -> str:
        """The registry key a create uses: the named one, or the default."""
        if not name:
            return self.default_name()
        if name not in FACTORIES or name not in self.configured:
            raise InvalidArgument(
                f"unknown provider {name!r}", fields={"provider_name": "not a registered provider"}
            )
        if name not in self._registered:
            raise ProviderUnavailable(f"provider {name!r} is not available", details={"provider": name})
        return name

    def get(self, name: str) -> Provider:
        p = self._registered.get(name)
        if p is None:
            raise ProviderUnavailable(f"provider {name!r} is not available", details={"provider": name})
        return p

    def capabilities(self, name: str) -> tuple[str, ...]:
        return tuple(FACTORIES[name].capabilities)

    def has(self, name: str) -> bool:
        return name in self._registered

    async def close(self) -> None:
        for p in self._candidates.values():
            await p.close()
