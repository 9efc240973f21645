"""The provider registry: providers by registry key, each registered once its engine answers.

`CTRLMESH_PROVIDERS` (default `docker`) names the keys to try; `DOCKER_HOST` (or
`CTRLMESH_DOCKER_HOST`) points both Docker-based providers at an engine. A provider whose engine
is not there at start is probed again on every probe interval and registered when it answers;
an instance keeps the key it was created with.

Which engines exist is the clusters service's to say (services/instances/placement.py): the
configured engine is its `main` cluster, and an instance placed on another cluster runs on a
provider of its kind built for that cluster's endpoint (`learn` records the endpoints; the
provider is made when first needed). An instance is found again by (provider key, cluster id).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from libs.errors import InvalidArgument, ProviderUnavailable
from libs.ids import MAIN_CLUSTER_ID
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
        self._settings = settings
        wanted = [n.strip() for n in settings.providers.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in FACTORIES]
        if unknown:
            log.warning("ignoring unknown providers in CTRLMESH_PROVIDERS: %s", ", ".join(unknown))
        self.configured = [n for n in wanted if n in FACTORIES]
        self._candidates: dict[str, Provider] = candidates or {
            n: self._make(n, settings.docker_host) for n in self.configured
        }
        # The clusters registry's engines: cluster id → endpoint, the default (`main`) cluster's
        # id once known, and the providers made for clusters other than the configured engine's.
        self._endpoints: dict[str, str] = {}
        # (`main` of a registry made before its id was fixed is learned from the clusters service.)
        self.default_cluster = MAIN_CLUSTER_ID
        self._cluster_providers: dict[tuple[str, str], Provider] = {}
        self._registered: dict[str, Provider] = {}
        self.health: dict[str, Health] = {}
        self._default = settings.default_provider
        # What the log last said of each provider: probes run every few seconds (and on each
        # GET of the providers), so only a change is worth a line.
        self._reported: dict[str, tuple[bool, str]] = {}

    def _make(self, name: str, endpoint: str | None) -> Provider:
        s = self._settings
        return FACTORIES[name](
            endpoint,
            pull=s.docker_pull,
            stop_timeout=s.instance_stop_timeout.total_seconds(),
            name=name,
            secrets_dir=s.secrets_runtime_dir,
            pg_socket_dir=s.pg_socket_path(),
        )

    # -- clusters --------------------------------------------------------------------------------

    def learn(self, cluster_id: str, endpoint: str, *, default: bool = False) -> None:
        """Record a cluster's engine endpoint (from the clusters service)."""
        old = self._endpoints.get(cluster_id)
        self._endpoints[cluster_id] = endpoint
        if default:
            self.default_cluster = cluster_id
        if old is not None and old != endpoint:
            for key in [k for k in self._cluster_providers if k[1] == cluster_id]:
                self._cluster_providers.pop(key)

    def known_clusters(self) -> set[str]:
        return set(self._endpoints)

    def knows(self, cluster_id: str) -> bool:
        return not cluster_id or cluster_id == self.default_cluster or cluster_id in self._endpoints

    def on_configured(self, cluster_id: str) -> bool:
        """Does the cluster run on the configured engine (`main`, or one registered again with
        its endpoint)? Then the configured providers serve it."""
        if not cluster_id or cluster_id == self.default_cluster:
            return True
        configured = self._settings.docker_host or "unix:///var/run/docker.sock"
        return self._endpoints.get(cluster_id) == configured

    def cluster_kinds(self, cluster_id: str, cluster_type: str) -> list[str]:
        """The provider keys that run on a cluster: the configured ones on the configured
        engine; a swarm's own (`swarm`) on a self_managed cluster; `docker` on another host."""
        if self.on_configured(cluster_id):
            return list(self.configured)
        return ["swarm"] if cluster_type == "self_managed" else ["docker"]

    async def close_cluster_providers(self) -> None:
        for p in self._cluster_providers.values():
            await p.close()
        self._cluster_providers.clear()

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

    def get(self, name: str, cluster_id: str = "") -> Provider:
        """The provider an instance of (`name`, `cluster_id`) runs on."""
        if not self.on_configured(cluster_id):
            return self._cluster_provider(name, cluster_id)
        p = self._registered.get(name)
        if p is None:
            raise ProviderUnavailable(f"provider {name!r} is not available", details={"provider": name})
        return p

    def _cluster_provider(self, name: str, cluster_id: str) -> Provider:
        key = (name, cluster_id)
        p = self._cluster_providers.get(key)
        if p is None:
            endpoint = self._endpoints.get(cluster_id)
            if endpoint is None or name not in FACTORIES:
                raise ProviderUnavailable(
                    f"the engine of cluster {cluster_id!r} is not known yet", details={"provider": name}
                )
            p = self._cluster_providers[key] = self._make(name, endpoint)
        return p

    def capabilities(self, name: str) -> tuple[str, ...]:
        return tuple(FACTORIES[name].capabilities)

    def has(self, name: str, cluster_id: str = "") -> bool:
        if not self.on_configured(cluster_id):
            return cluster_id in self._endpoints and name in FACTORIES
        return name in self._registered

    async def close(self) -> None:
        for p in self._candidates.values():
            await p.close()
        await self.close_cluster_providers()
