"""Secrets: per-instance values, envelope-encrypted, versioned, injected at every rollout.

- Set is an upsert by key: a new key is version 1 (type default `env`), an existing key gets
  version n + 1 and keeps its type unless one is given; every earlier version is kept, so a
  rollback can run with the value its release ran with. A new key counts against the tenant's
  `max_secrets` (429 QuotaExceeded), decided under a per-tenant advisory lock.
- Each version is encrypted with `libs.crypto` (a fresh AES-256-GCM data key wrapped by the KEK;
  AAD = secret id and version, so a ciphertext moved to another row does not decrypt).
- Nothing here returns a value except `resolve`, which only the instances service's system
  principal may call (PERMISSION_DENIED for everyone else, other system principals included).
- Events `secret.set` / `secret.deleted` carry the key, type and version, never the value.
- `rewrap_pass` moves every version still under a retired KEK to the current one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.crypto import Keyring
from libs.db import Database
from libs.errors import InvalidArgument, InvalidState, PermissionDenied, QuotaExceeded, not_found
from libs.outbox import Outbox
from libs.principal import Principal, is_global, is_system
from libs.reconcile import every
from libs.timeutil import now
from services.network.secrets import repository as repo
from services.network.secrets.peers import Owner, Peers
from services.network.secrets.repository import SecretRow

log = logging.getLogger("ctrlmesh.network.secrets")

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TYPES = ("env", "file", "registry", "tls")
# The one caller of ResolveSecrets.
RESOLVER = "system:instances"

SET = "secret.set"
DELETED = "secret.deleted"


@dataclass(frozen=True)
class Resolved:
    id: str
    key: str
    type: str
    version: int
    value: str


def _aad(secret_id: str, version: int) -> str:
    return f"{secret_id}:{version}"


class SecretsDomain:
    def __init__(self, db: Database, keyring: Keyring, outbox: Outbox, peers: Peers):
        self.db = db
        self.keyring = keyring
        self.outbox = outbox
        self.peers = peers

    async def _owner(self, p: Principal, instance_id: str, *, write: bool) -> Owner:
        owner = await self.peers.owner(p, instance_id)
        if write and owner.tenant_status == "suspended" and not is_global(p):
            raise PermissionDenied(
                "the tenant is suspended; its secrets are read-only", details={"tenant_id": owner.tenant_id}
            )
        return owner

    async def _publish(self, s: AsyncSession, type_: str, owner: Owner, row: SecretRow, **extra: str) -> None:
        await self.outbox.publish(
            s,
            type_,
            resource="secret",
            resource_id=row.id,
            tenant_id=owner.tenant_id,
            account_id=owner.account_id,
            data={
                "secret_id": row.id,
                "instance_id": row.instance_id,
                "key": row.key,
                "type": row.type,
                "version": row.version,
                **extra,
            },
        )

    async def set(
        self, p: Principal, instance_id: str, key: str, value: str, type_: str, *, rollout: bool
    ) -> tuple[SecretRow, str]:
        owner = await self._owner(p, instance_id, write=True)
        t = now()
        async with self.outbox.session() as s:
            existing = await repo.get(s, owner.tenant_id, instance_id, key, lock=True)
            kind = type_ or (existing.type if existing else "env")
            if kind == "env" and not ENV_KEY.match(key):
                raise InvalidArgument(
                    "an env secret's key must be a valid environment variable name",
                    fields={"key": "must match ^[A-Za-z_][A-Za-z0-9_]*$ for an env secret"},
                )
            if existing is None:
                await repo.lock_tenant(s, owner.tenant_id)
                # Read again under the lock: a concurrent set of the same key may have won.
                existing = await repo.get(s, owner.tenant_id, instance_id, key, lock=True)
            if existing is None:
                used = await repo.count_tenant(s, owner.tenant_id)
                if owner.max_secrets and used + 1 > owner.max_secrets:
                    raise QuotaExceeded(
                        f"quota max_secrets of {owner.max_secrets} would be exceeded: {used} in use",
                        details={
                            "quota": "max_secrets",
                            "limit": owner.max_secrets,
                            "used": used,
                            "requested": 1,
                        },
                    )
                row = SecretRow(ids.new_id("sec"), owner.tenant_id, instance_id, key, kind, 1, t, t)
                await repo.insert_secret(s, row)
            else:
                row = SecretRow(
                    existing.id,
                    existing.tenant_id,
                    existing.instance_id,
                    key,
                    existing.type,
                    existing.version + 1,
                    existing.created_at,
                    t,
                )
                if type_ and type_ != existing.type:
                    raise InvalidArgument(
                        f"secret {key!r} is of type {existing.type}; delete it to change its type",
                        fields={"type": f"the secret is {existing.type}"},
                    )
                await repo.set_version(s, row.id, row.version, t)
            await repo.insert_version(
                s,
                secret_id=row.id,
                tenant_id=row.tenant_id,
                version=row.version,
                value_enc=self.keyring.encrypt_str(value, aad=_aad(row.id, row.version)),
                kek_id=self.keyring.primary,
                at=t,
            )
            await self._publish(s, SET, owner, row)
        deployment = ""
        if rollout:
            deployment = await self._rollout(p, owner, f"secret {key} set (version {row.version})")
        return row, deployment

    async def _rollout(self, p: Principal, owner: Owner, notes: str) -> str:
        try:
            return await self.peers.instances.rollout(p, owner.instance_id, owner.image, notes)
        except InvalidState as err:
            # The change is stored; only the rollout could not start (the instance is not running,
            # or a deployment is already under way): say both.
            raise InvalidState(
                f"the secret change is stored and applies at the next rollout, but none started now: {err.message}",
                details=dict(err.details),
            ) from None

    async def list_for(self, p: Principal, instance_id: str) -> list[SecretRow]:
        owner = await self._owner(p, instance_id, write=False)
        async with self.db.session() as s:
            return await repo.list_for(s, owner.tenant_id, instance_id)

    async def delete(self, p: Principal, instance_id: str, key: str, *, rollout: bool) -> None:
        owner = await self._owner(p, instance_id, write=True)
        async with self.outbox.session() as s:
            row = await repo.get(s, owner.tenant_id, instance_id, key, lock=True)
            if row is None:
                raise not_found("secret", key)
            await repo.delete_secret(s, owner.tenant_id, row.id)
            await self._publish(s, DELETED, owner, row)
        if rollout:
            await self._rollout(p, owner, f"secret {key} deleted")

    async def resolve(
        self, p: Principal, tenant_id: str, instance_id: str, versions: dict[str, int], type_: str
    ) -> tuple[list[Resolved], list[str]]:
        """Plaintext for injection: the current versions, or exactly `versions` (a release's
        record); also the keys of `versions` that no longer exist."""
        if not is_system(p) or p.key_id != RESOLVER:
            raise PermissionDenied("ResolveSecrets is internal to the instances service")
        async with self.db.session() as s:
            found = await repo.versions(s, tenant_id, instance_id, versions or None, type_)
        out = [
            Resolved(
                v.secret_id,
                v.key,
                v.type,
                v.version,
                self.keyring.decrypt_str(v.value_enc, aad=_aad(v.secret_id, v.version)),
            )
            for v in found
        ]
        have = {v.key for v in found}
        missing = sorted(k for k in versions if k not in have) if versions else []
        return out, missing

    # -- secrets of deleted instances -----------------------------------------------------------

    async def forget_instance(self, tenant_id: str, instance_id: str, account_id: str = "") -> int:
        """Delete the secrets of an instance that is gone (they would hold quota forever)."""
        async with self.outbox.session() as s:
            rows = await repo.delete_instance(s, tenant_id, instance_id)
            owner = Owner(instance_id, tenant_id, account_id, "", 0, "")
            for row in rows:
                await self._publish(s, DELETED, owner, row, reason="instance_deleted")
        if rows:
            log.info("deleted %d secret(s) of deleted instance %s", len(rows), instance_id)
        return len(rows)

    async def follow_deletions(self) -> None:
        """Forget the secrets of each instance the instances service deletes, as it happens."""

        async def follow() -> None:
            try:
                async for event in self.peers.instances.deletions():
                    if event.type == "instance.deleted":
                        await self.forget_instance(event.tenant_id, event.resource_id, event.account_id)
            except grpc.aio.AioRpcError as err:
                # The instances service restarting (or not up yet): the sweep covers the gap.
                log.info("the instances event stream is unavailable (%s); retrying", err.code().name)

        await every("instance deletion follower", 1.0, follow, first=0, jitter=0)

    async def sweep_orphans(self) -> int:
        """The backstop of the follower (deletions while this service was down): the secrets of
        every instance the instances service no longer knows."""
        async with self.db.session() as s:
            held = await repo.instances_with_secrets(s)
        gone = 0
        for tenant_id, instance_id in held:
            if not await self.peers.instances.exists(instance_id):
                gone += await self.forget_instance(tenant_id, instance_id)
        return gone

    async def rewrap_pass(self, batch: int = 200) -> int:
        """Re-wrap every stored version whose data key is wrapped by a retired KEK (or whose KEK
        id is not recorded yet); returns how many changed."""
        done = 0
        primary = self.keyring.primary
        while True:
            async with self.db.session() as s:
                todo = await repo.not_wrapped_by(s, primary, batch)
            if not todo:
                break
            changed = 0
            async with self.db.session() as s:
                for w in todo:
                    if await repo.replace_ciphertext(s, w, self.keyring.rewrap(w.value_enc), primary):
                        changed += 1
            done += changed
            if changed == 0:
                break
        if done:
            log.info("re-wrapped %d secret version(s) to KEK %s", done, primary)
        return done
