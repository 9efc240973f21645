"""The ingress: keeps Caddy holding exactly the configuration the network schema describes.

Two loops, both on libs.reconcile.every:

- `apply_loop`: renders the whole config from the schema (routes, the ingress's copy of each
  instance, and the domains package's `IngressInputs`) and loads it when it differs from what
  Caddy reports. A restarted Caddy holds nothing, so it is refilled on the next pass (every
  `ingress_reconcile_interval`); `wake()` runs a pass at once after a change.
- `follow_loop` + `hot_loop` + `resync_loop`: keep `ingress_instances` true to the instances
  service. Each of its events about an instance (created, started, stopped, scaled, a
  deployment running or ending, ...) refreshes that instance from `ListReplicaEndpoints` (every
  running replica of any release) and keeps it *hot*: refreshed every `HOT_EVERY` seconds while
  a deployment runs and for `HOT_FOR` seconds after its last event, so a rollout's new replicas
  are in Caddy's upstreams before the old ones stop. A periodic resync catches anything missed
  (a network service that was down, an event stream that broke).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter, Gauge

from libs.errors import NotFound, Unavailable
from libs.events import STREAM_HEAD
from libs.outbox import Outbox
from libs.reconcile import every
from libs.timeutil import now
from services.network import events
from services.network import repository as repo
from services.network.ingress.caddy import CaddyAdmin
from services.network.ingress.inputs import IngressInputs, NoInputs, TlsCertificate
from services.network.ingress.render import Listen, Snapshot, render
from services.network.peers import Accounts, Instances, LiveInstance, TenantRef

log = logging.getLogger("ctrlmesh.network.ingress")

LOADS = Counter("ctrlmesh_ingress_config_loads_total", "Configs loaded into Caddy")
UPSTREAMS = Gauge("ctrlmesh_ingress_upstreams", "Replica endpoints in Caddy's config")

HOT_EVERY = 0.15
HOT_FOR = 20.0
_DEPLOY_OVER = ("deploy.succeeded", "deploy.failed", "deploy.cancelled", "deploy.rolled_back")


class Ingress:
    def __init__(
        self,
        outbox: Outbox,
        caddy: CaddyAdmin,
        instances: Instances,
        accounts: Accounts,
        listen: Listen,
        *,
        interval: float,
        resync_interval: float,
    ):
        self.outbox = outbox
        self.caddy = caddy
        self.instances = instances
        self.accounts = accounts
        self.listen = listen
        self.interval = interval
        self.resync_interval = resync_interval
        self.inputs: IngressInputs = NoInputs()
        self._wake = asyncio.Event()
        self._tenants: dict[str, TenantRef] = {}
        # instance id → monotonic time until which it is refreshed every HOT_EVERY seconds.
        self._hot: dict[str, float] = {}
        self._deploying: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def use_inputs(self, inputs: IngressInputs) -> None:
        """Render custom domains, certificates and challenges from `inputs` (the domains package)."""
        self.inputs = inputs
        self.wake()

    def current_inputs(self) -> IngressInputs:
        return self.inputs

    def wake(self) -> None:
        """Render and apply now (after a change of routes, domains, certificates or challenges)."""
        self._wake.set()

    async def changed(self, instance_id: str) -> None:
        """After a committed change of an instance's routes: its replicas looked up (it may be
        new to the ingress) and the config applied. The change is already committed, so a
        failed lookup is the resync's to retry, never the caller's error."""
        try:
            await self.refresh(instance_id)
        except Exception:
            log.warning("could not refresh instance %s after a route change", instance_id, exc_info=True)
        self.wake()

    # -- Caddy -----------------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Everything the config is rendered from, read in one transaction."""
        async with self.outbox.session() as s:
            return Snapshot(
                instances=await repo.all_instances(s),
                routes=await repo.all_routes(s),
                hosts=await self.inputs.verified_hosts(s),
                certificates=[c for c in await self.inputs.certificates(s) if usable(c)],
                challenges=await self.inputs.challenges(s),
            )

    async def desired(self) -> dict[str, Any]:
        return render(await self.snapshot(), self.listen)

    async def apply(self) -> bool:
        """Load the rendered config when Caddy holds anything else; True when it loaded."""
        want = await self.desired()
        UPSTREAMS.set(_count_dials(want))
        if await self.caddy.config() == want:
            return False
        await self.caddy.load(want)
        LOADS.inc()
        log.info("ingress config loaded into Caddy (%d upstream endpoints)", _count_dials(want))
        return True

    async def apply_loop(self) -> None:
        await every("ingress apply", self.interval, self.apply, first=0, jitter=0, wake=self._wake)

    # -- following the instances service ---------------------------------------------------------

    async def _tenant(self, tenant_id: str) -> TenantRef:
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = await self.accounts.tenant(tenant_id)
        return t

    async def refresh(self, instance_id: str) -> bool:
        """Bring the ingress's copy of one instance up to date; True when it changed. One at a
        time per instance, so an older answer is never stored over a newer one."""
        lock = self._locks.setdefault(instance_id, asyncio.Lock())
        async with lock:
            try:
                inst = await self.instances.replicas(instance_id)
            except NotFound:
                return await self._forget(instance_id)
            return await self._store(inst)

    async def _store(self, inst: LiveInstance) -> bool:
        tenant = await self._tenant(inst.tenant_id)
        values = {
            "instance_id": inst.id,
            "tenant_id": inst.tenant_id,
            "account_id": tenant.account_id,
            "tenant_slug": tenant.slug,
            "slug": inst.slug,
            "state": inst.state,
            "main_service": inst.main_service,
            "ports": [{"container_port": p, "protocol": proto} for p, proto in inst.ports],
            "upstreams": [
                {"service": u.service, "container_port": u.container_port, "host_port": u.host_port}
                for u in sorted(inst.upstreams, key=lambda u: (u.service, u.container_port, u.host_port))
            ],
        }
        async with self.outbox.session() as s:
            old = await repo.get_instance(s, inst.id)
            if old is not None and all(getattr(old, k) == v for k, v in values.items()):
                return False
            await repo.upsert_instance(s, {**values, "updated_at": now()})
        self.wake()
        return True

    async def _forget(self, instance_id: str) -> bool:
        """The instance is gone: so are its routes (each with its `route.removed`)."""
        async with self.outbox.session() as s:
            known = await repo.get_instance(s, instance_id)
            removed = await repo.delete_instance_routes(s, instance_id)
            for r in removed:
                await events.publish_route(self.outbox, s, events.ROUTE_REMOVED, r, reason="instance_deleted")
            await repo.delete_instance(s, instance_id)
        self._hot.pop(instance_id, None)
        self._deploying.discard(instance_id)
        self._locks.pop(instance_id, None)
        if known is None and not removed:
            return False
        self.wake()
        return True

    def _heat(self, instance_id: str, event_type: str) -> None:
        self._hot[instance_id] = time.monotonic() + HOT_FOR
        if event_type.startswith("deploy."):
            if event_type in _DEPLOY_OVER:
                self._deploying.discard(instance_id)
            else:
                self._deploying.add(instance_id)

    async def follow(self) -> None:
        """One pass over the instances service's event stream (from now; the resync covers
        whatever happened while it was not followed). A stream that cannot be had (the
        instances service starting or restarting) is one log line, not a traceback a second."""
        try:
            await self._follow()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.info("the instances event stream is unavailable; retrying")

    async def _follow(self) -> None:
        async for ev in self.instances.watch(None):
            if ev.type == STREAM_HEAD:
                continue
            if ev.resource == "instance":
                instance_id = ev.resource_id
            elif "instance_id" in ev.data.fields:
                instance_id = ev.data.fields["instance_id"].string_value
            else:
                continue
            self._heat(instance_id, ev.type)
            try:
                await self.refresh(instance_id)
            except Exception:
                log.warning("could not refresh instance %s after %s", instance_id, ev.type, exc_info=True)

    async def follow_loop(self) -> None:
        await every("ingress instance follower", 1.0, self.follow, first=0, jitter=0)

    async def refresh_hot(self) -> None:
        t = time.monotonic()
        for instance_id, until in list(self._hot.items()):
            if until < t and instance_id not in self._deploying:
                del self._hot[instance_id]
                continue
            try:
                await self.refresh(instance_id)
            except Exception:
                log.debug("could not refresh hot instance %s", instance_id, exc_info=True)

    async def hot_loop(self) -> None:
        await every("ingress hot instances", HOT_EVERY, self.refresh_hot, jitter=0)

    async def resync(self) -> None:
        """Every instance refreshed; rows of instances that no longer exist removed."""
        try:
            live = set(await self.instances.all_ids())
        except Unavailable:
            log.info("the instances service is unavailable; resync postponed")
            return
        async with self.outbox.session() as s:
            known = set(await repo.instance_ids(s))
        for instance_id in sorted(live):
            await self.refresh(instance_id)
        for instance_id in sorted(known - live):
            await self._forget(instance_id)

    async def resync_loop(self) -> None:
        await every("ingress resync", self.resync_interval, self.resync, first=0)

    def background(self) -> list[Callable[[], Any]]:
        return [self.apply_loop, self.follow_loop, self.hot_loop, self.resync_loop]


def usable(cert: TlsCertificate) -> bool:
    """Whether Caddy can load the pair: one unreadable certificate must not make Caddy refuse the
    whole config (and with it every other change), so it is left out and logged instead."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        public = x509.load_pem_x509_certificate(cert.cert_pem.encode()).public_key().public_bytes(*spki)
        key = serialization.load_pem_private_key(cert.key_pem.encode(), password=None)
        matches = key.public_key().public_bytes(*spki) == public
    except (ValueError, TypeError):
        matches = False
    if not matches:
        log.warning(
            "the certificate of %s and its key are not a readable, matching pair; not loaded", cert.hostname
        )
    return matches


def _count_dials(config: Any) -> int:
    if isinstance(config, dict):
        return int("dial" in config) + sum(_count_dials(v) for v in config.values())
    if isinstance(config, list):
        return sum(_count_dials(v) for v in config)
    return 0
