"""Zectre managed databases: each one a serverless database of the caller's tenant, created
through the databases service with the caller's own principal (so its permissions and plan
limits apply), and bound to at most one app (an instance) whose secrets then carry the
connection.

- The display name (`my-postgres`) maps to a PostgreSQL name (`my_postgres`): `connection_database`.
- `status` follows the backing database: `creating` → creating; `stopped`, `booting`, `ready`,
  `stopping` → ready (a stopped database wakes on connect); `error` → error; `deleting` (or
  gone) → deleting.
- `connection_host/port/user` are the PG Gateway's public address and the tenant's role.
- How a bound app reaches the gateway: an app of the `docker` provider on a local engine (a Unix
  socket: the containers run on this host) gets the gateway's Unix socket directory mounted at
  /run/ctrlmesh/pg (libs/pg_socket.py; the docker provider mounts it when PGHOST names it), so
  `PGHOST=/run/ctrlmesh/pg`, `PGSSLMODE=disable` (no TLS on a Unix socket: libpq never asks
  for it there, and a client that would gets 'N') and
  `DATABASE_URL=postgresql://user:pass@/db?host=/run/ctrlmesh/pg&port=<port>`; traffic never
  leaves the host, and the gateway still authenticates with SCRAM. Every other app (a swarm, a
  remote engine: its containers run on other hosts) gets TCP with TLS to the gateway's
  advertised address (`CTRLMESH_PUBLIC_PG_HOST:CTRLMESH_PG_PORT`, `PGSSLMODE=require`).
- One app per database: binding a database bound elsewhere, or an app that already has one, is
  409. DELETE of a bound database is 409 unless `force`, which unbinds first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from libs import events as events_lib
from libs import pg_socket
from libs import principal as principals
from libs.errors import AlreadyExists, CtrlmeshError, InvalidArgument, InvalidState, not_found
from libs.ids import is_uuid
from libs.outbox import Outbox
from services.clusters import events
from services.clusters import repository as repo
from services.clusters.intents import Intents
from services.clusters.peers import Accounts, Databases, Instances
from services.clusters.peers import Secrets as SecretsPeer
from services.clusters.repository import ManagedRow, Scope

log = logging.getLogger("ctrlmesh.clusters.managed")

STATUS = {
    "creating": "creating",
    "stopped": "ready",
    "booting": "ready",
    "ready": "ready",
    "stopping": "ready",
    "error": "error",
    "deleting": "deleting",
}
BOUND_KEYS = ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE")


def pg_name(display: str) -> str:
    return display.replace("-", "_")


@dataclass(frozen=True)
class Connection:
    host: str
    port: int
    sslmode: str = "require"
    # The gateway listens on a Unix socket too (CTRLMESH_PG_SOCKET_DIR not "off"): local apps
    # are given its directory as mounted in their containers.
    socket: bool = False


@dataclass(frozen=True)
class View:
    """A managed database as the API shows it: the row, its live status and its role."""

    row: ManagedRow
    status: str
    user: str


class Secrets(Protocol):
    """Where a binding writes the connection: the instance's secrets (network's SecretService)."""

    async def bind(
        self, caller: principals.Principal, app_id: str, values: dict[str, str], *, rollout: bool = False
    ) -> None: ...

    async def unbind(self, caller: principals.Principal, app_id: str, keys: tuple[str, ...]) -> None: ...


CA_SECRET = "pg-gateway-ca.crt"
# Where a file secret appears inside the app's containers (the instances providers' mount).
SECRETS_MOUNT = "/run/secrets"


class InstanceSecrets:
    """Bindings as secrets of the instance: env secrets for the connection, and the PG Gateway's CA
    as a file secret with PGSSLROOTCERT naming it (libpq then verifies the gateway even with
    sslmode=require). The last write starts the rolling deploy when asked, so the app is
    rolled once with every value."""

    def __init__(self, peer: SecretsPeer, ca_file: Path | None):
        self.peer = peer
        self.ca_file = ca_file

    async def bind(
        self, caller: principals.Principal, app_id: str, values: dict[str, str], *, rollout: bool = False
    ) -> None:
        items = [(k, v, "env") for k, v in values.items()]
        if self.ca_file is not None and self.ca_file.exists():
            items.append((CA_SECRET, self.ca_file.read_text(), "file"))
            items.append(("PGSSLROOTCERT", f"{SECRETS_MOUNT}/{CA_SECRET}", "env"))
        for i, (key, value, kind) in enumerate(items):
            await self.peer.set(caller, app_id, key, value, kind, rollout=rollout and i == len(items) - 1)

    async def unbind(self, caller: principals.Principal, app_id: str, keys: tuple[str, ...]) -> None:
        for key in (*keys, CA_SECRET):
            await self.peer.delete(caller, app_id, key)


class ManagedDatabases:
    def __init__(
        self,
        db: Any,
        outbox: Outbox,
        accounts: Accounts,
        databases: Databases,
        instances: Instances,
        secrets: Secrets,
        *,
        gateway: Connection,
        versions: tuple[str, ...],
        intents: Intents,
    ):
        self.db = db
        self.intents = intents
        self.outbox = outbox
        self.accounts = accounts
        self.databases = databases
        self.instances = instances
        self.secrets = secrets
        self.gateway = gateway
        self.versions = versions

    async def _target_tenant(self, p: principals.Principal, tenant_id: str) -> tuple[str, str, str]:
        """(tenant id, account id, pg_user) of the tenant the caller creates in."""
        if p.scope == "tenant":
            if tenant_id and tenant_id != p.tenant_id:
                # Another tenant reads as one that does not exist (as the instances service says).
                raise not_found("tenant", tenant_id)
            tenant_id = p.tenant_id
        elif not tenant_id:
            raise InvalidArgument(
                "tenant_id is required for this key", fields={"tenant_id": "required for this key"}
            )
        t = await self.accounts.resolve_tenant(p, tenant_id)
        return t.id, t.account_id, t.pg_user

    async def view(self, row: ManagedRow) -> View:
        d = await self.databases.get(row.db_id)
        if row.state == "deleting" or d is None:
            status = "deleting"
        else:
            status = STATUS.get(d.state, "error")
        return View(row, status, await self._pg_user(row))

    async def _pg_user(self, row: ManagedRow) -> str:
        t = await self.accounts.resolve_tenant(principals.system_principal("clusters"), row.tenant_id)
        return str(t.pg_user)

    async def create(
        self,
        p: principals.Principal,
        *,
        cluster_id: str,
        name: str,
        engine: str,
        version: str,
        tenant_id: str,
    ) -> View:
        if (engine or "postgres") != "postgres":
            raise InvalidArgument("engine must be postgres", fields={"engine": "only postgres is supported"})
        version = version or self.versions[0]
        if version not in self.versions:
            raise InvalidArgument(
                f"PostgreSQL {version} is not run by this platform; supported: {', '.join(self.versions)}",
                fields={"version": f"supported: {', '.join(self.versions)}"},
            )
        async with self.db.session() as s:
            cluster = await repo.get_cluster(s, cluster_id) if is_uuid(cluster_id) else None
        if cluster is None:
            raise not_found("cluster", cluster_id)
        tid, account_id, _ = await self._target_tenant(p, tenant_id)
        pname = pg_name(name)
        async with self.db.session() as s:
            if await repo.managed_names_taken(s, tid, pname):
                raise AlreadyExists(f"a managed database named {name!r} exists", details={"name": name})
        # Journaled: a process killed between the backing database and our row leaves no
        # database that nothing names (the next start deletes it).
        intent = await self.intents.begin("managed_create", tid, pg_name=pname)
        try:
            backing = await self.databases.create(p, tid, pname)
        except BaseException:
            await self.intents.finish(intent)
            raise
        try:
            async with self.outbox.session() as s:
                await self.intents.finish_in(s, intent)
                # One UUID for both: the managed database is its serverless database.
                row = await repo.insert_managed(
                    s,
                    id=backing.db_id,
                    tenant_id=tid,
                    account_id=account_id,
                    cluster_id=cluster.id,
                    name=name,
                    pg_name=pname,
                    engine="postgres",
                    version=version,
                    db_id=backing.db_id,
                    app_id=None,
                    state="active",
                )
                await events.publish(
                    self.outbox,
                    s,
                    events.MANAGED_CREATED,
                    "managed_database",
                    row.id,
                    events.snapshot(row),
                    tenant_id=tid,
                    account_id=account_id,
                )
        except Exception:
            await self.databases.delete(tid, pname)
            await self.intents.finish(intent)
            raise
        return View(row, STATUS.get(backing.state, "creating"), await self._pg_user(row))

    async def _load(self, p: principals.Principal, md_id: str) -> ManagedRow:
        async with self.db.session() as s:
            row = await repo.get_managed(s, Scope.of(p), md_id) if is_uuid(md_id) else None
        if row is None:
            raise not_found("managed database", md_id)
        return row

    async def get(self, p: principals.Principal, md_id: str) -> View:
        return await self.view(await self._load(p, md_id))

    async def list(self, p: principals.Principal) -> list[View]:
        async with self.db.session() as s:
            rows = await repo.list_managed(s, Scope.of(p))
        return [await self.view(r) for r in rows]

    async def delete(self, p: principals.Principal, md_id: str, *, force: bool) -> None:
        row = await self._load(p, md_id)
        if row.app_id and not force:
            raise InvalidState(
                f"managed database {md_id!r} is bound to {row.app_id}; unbind it or use force=true",
                details={"app_id": row.app_id},
            )
        if row.app_id:
            await self.secrets.unbind(p, row.app_id, (*BOUND_KEYS, "PGSSLROOTCERT"))
            # The app keeps running with the values it has until its next rollout.
        async with self.outbox.session() as s:
            await repo.update_managed(s, row.id, state="deleting", app_id=None)
        await self.databases.delete(row.tenant_id, row.pg_name)
        async with self.outbox.session() as s:
            await repo.delete_managed(s, row.id)
            await events.publish(
                self.outbox,
                s,
                events.MANAGED_DELETED,
                "managed_database",
                row.id,
                events.snapshot(row),
                tenant_id=row.tenant_id,
                account_id=row.account_id,
            )

    async def rotation_loop(self) -> None:
        """Follow accounts' `tenant.credentials_rotated` events: every app bound to a database of
        that tenant gets the new password in its secrets and is rolled (from now, as the
        databases service follows them: a rotation while this service is down is picked up by
        the next bind or rotation)."""
        last: int | None = None
        while True:
            try:
                async for ev in self.accounts.watch(["tenant.credentials_rotated"], last):
                    last = int(ev.id)
                    if ev.type != events_lib.STREAM_HEAD:
                        await self.rebind_tenant(ev.tenant_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.info("accounts event stream interrupted (%s); reconnecting", err)
            await asyncio.sleep(1.0)

    async def rebind_tenant(self, tenant_id: str) -> int:
        """Write the tenant's current credentials into every bound app and roll it; how many."""
        system = principals.system_principal("clusters")
        async with self.db.session() as s:
            rows = [r for r in await repo.list_managed(s, Scope(tenant_id=tenant_id)) if r.app_id]
        if not rows:
            return 0
        creds = await self.accounts.credentials(tenant_id)
        for row in rows:
            assert row.app_id is not None
            try:
                app = await self.instances.get(system, row.app_id)
                await self.secrets.bind(
                    system,
                    row.app_id,
                    self.connection(row, creds.pg_user, creds.pg_password, socket=await self.on_socket(app)),
                    rollout=app.state == "running",
                )
            except CtrlmeshError:
                log.warning("could not give %s the rotated credentials", row.app_id, exc_info=True)
        return len(rows)

    async def on_socket(self, app: Any) -> bool:
        """Does the app reach the gateway through its Unix socket? Only a `docker` app on a
        local engine (a unix:// endpoint: its containers share this host's filesystem)."""
        if not self.gateway.socket or app.provider_name != "docker":
            return False
        async with self.db.session() as s:
            c = await repo.get_cluster(s, app.cluster_id) if is_uuid(app.cluster_id) else None
            if c is None:
                c = await repo.cluster_by_name(s, "main")
        return c is not None and c.type == "local" and c.endpoint.startswith("unix://")

    def connection(self, row: ManagedRow, user: str, password: str, *, socket: bool) -> dict[str, str]:
        g = self.gateway
        cred = f"{quote(user, safe='')}:{quote(password, safe='')}"
        if socket:
            host, sslmode = pg_socket.CONTAINER_DIR, "disable"
            url = f"postgresql://{cred}@/{row.pg_name}?host={host}&port={g.port}"
        else:
            host, sslmode = g.host, g.sslmode
            url = f"postgres://{cred}@{g.host}:{g.port}/{row.pg_name}?sslmode={g.sslmode}"
        return {
            "DATABASE_URL": url,
            "PGHOST": host,
            "PGPORT": str(g.port),
            "PGUSER": user,
            "PGPASSWORD": password,
            "PGDATABASE": row.pg_name,
            "PGSSLMODE": sslmode,
        }

    async def bind(self, p: principals.Principal, md_id: str, app_id: str, *, restart: bool = True) -> View:
        row = await self._load(p, md_id)
        app = await self.instances.get(p, app_id)
        if app.tenant_id != row.tenant_id:
            raise not_found("instance", app_id)
        if row.app_id and row.app_id != app_id:
            raise InvalidState(
                f"managed database {md_id!r} is bound to another app", details={"app_id": row.app_id}
            )
        async with self.db.session() as s:
            other = await repo.managed_bound_to(s, app_id)
        if other is not None and other.id != row.id:
            raise InvalidState(
                f"app {app_id!r} is bound to another managed database",
                details={"managed_database_id": other.id},
            )
        creds = await self.accounts.credentials(row.tenant_id)
        # A running app is rolled (a rolling deploy with the new secrets); one not running yet
        # starts with them.
        roll = restart and app.state == "running"
        await self.secrets.bind(
            p,
            app_id,
            self.connection(row, creds.pg_user, creds.pg_password, socket=await self.on_socket(app)),
            rollout=roll,
        )
        async with self.outbox.session() as s:
            locked = await repo.get_managed(s, Scope(), row.id, lock=True)
            if locked is None:
                raise not_found("managed database", md_id)
            if locked.app_id and locked.app_id != app_id:
                raise InvalidState(
                    f"managed database {md_id!r} is bound to another app", details={"app_id": locked.app_id}
                )
            await repo.update_managed(s, row.id, app_id=app_id)
            fresh = await repo.get_managed(s, Scope(), row.id)
            assert fresh is not None
            await events.publish(
                self.outbox,
                s,
                events.MANAGED_BOUND,
                "managed_database",
                row.id,
                {**events.snapshot(fresh), "app_id": app_id},
                tenant_id=row.tenant_id,
                account_id=row.account_id,
            )
        return await self.view(fresh)
