"""What a rollout needs of an instance's secrets, from the network service's ResolveSecrets
(called with this service's system principal, the only one network answers).

A release records the secret versions it ran with (`releases.secret_versions`, key → version):
- a release's first rollout (create, deploy) and every (re)start resolve the *current* versions
  and record them, so setting or deleting a secret takes effect at the next rollout;
- any other group of a release that has a record (a rollback, the previous release a rollout
  scales down or restores, a scale) resolves exactly the recorded versions, so a rollback runs
  with the values its release ran with. A recorded secret deleted since is left out.

The result is an `Injection` for the provider: env secrets (over the service's env), files for
/run/secrets (`file` and `tls` secrets), registry credentials for pulls, and a fingerprint of the
exact versions (never of values).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from typing import Any

import grpc
from ctrlmesh.network.v1 import network_pb2, network_pb2_grpc
from sqlalchemy import select, update

from libs.clients import Channels, Signer
from libs.db import Database
from libs.errors import CtrlmeshError
from libs.peers import Peer
from services.instances.models import releases
from services.instances.providers.base import Injection, ProviderError

log = logging.getLogger("ctrlmesh.instances.secrets")

TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def registry_credentials(key: str, value: str) -> list[dict[str, str]]:
    """A `registry` secret's credentials: `{"username", "password", "serveraddress"}` (what
    X-Registry-Auth carries) or a Docker config (`{"auths": {host: {"auth": b64(user:pass)}}}`)."""
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("auths"), dict):
        out = []
        for host, entry in doc["auths"].items():
            if not isinstance(entry, dict):
                continue
            user, password = entry.get("username", ""), entry.get("password", "")
            if entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    continue
            out.append({"username": str(user), "password": str(password), "serveraddress": str(host)})
        return out
    if isinstance(doc, dict) and doc.get("username"):
        return [{k: str(doc.get(k, "")) for k in ("username", "password", "serveraddress")}]
    # The value is not shown: it is a credential.
    log.warning("registry secret %s is neither {username, password, serveraddress} nor a Docker config", key)
    return []


def injection(found: list[network_pb2.ResolvedSecret]) -> Injection:
    env: dict[str, str] = {}
    files: dict[str, bytes] = {}
    auths: list[dict[str, str]] = []
    for sec in found:
        if sec.type == "env":
            env[sec.key] = sec.value
        elif sec.type in ("file", "tls"):
            files[sec.key] = sec.value.encode()
        elif sec.type == "registry":
            auths.extend(registry_credentials(sec.key, sec.value))
    names = "\n".join(f"{s.key}\t{s.id}\t{s.version}" for s in sorted(found, key=lambda s: s.key))
    fingerprint = hashlib.sha256(names.encode()).hexdigest()[:16] if found else ""
    return Injection(env=env, files=files, registry_auth=tuple(auths), fingerprint=fingerprint)


class SecretsClient(Peer):
    service = "network"

    def __init__(self, channels: Channels, signer: Signer, db: Database, timeout: float = 5.0):
        super().__init__(channels, signer, timeout)
        self.db = db

    async def resolve(
        self, tenant_id: str, instance_id: str, versions: dict[str, int] | None
    ) -> tuple[list[network_pb2.ResolvedSecret], list[str]]:
        req = network_pb2.ResolveSecretsRequest(
            tenant_id=tenant_id, instance_id=instance_id, versions=versions or {}
        )
        try:
            got = await self.call(network_pb2_grpc.SecretServiceStub(self.channel).ResolveSecrets, req)
        except CtrlmeshError as err:
            if err.code in TRANSIENT:
                # The network service is down or slow (starting, restarting): the step fails and the
                # reconcile engine runs it again; the rollout waits instead of failing.
                raise
            # A rollout that cannot have its secrets must not start without them.
            raise ProviderError(f"the instance's secrets could not be resolved: {err.message}") from None
        return list(got.secrets), list(got.missing)

    async def for_release(
        self, tenant_id: str, instance_id: str, release_id: str, *, current: bool = False
    ) -> Injection:
        """The secrets a group of `release_id` starts with: its recorded versions, or (with
        `current`, or when it has no record yet) the current ones, then recorded."""
        recorded: dict[str, Any] | None = None
        if release_id and not current:
            async with self.db.session() as s:
                recorded = await s.scalar(
                    select(releases.c.secret_versions).where(
                        releases.c.id == release_id, releases.c.tenant_id == tenant_id
                    )
                )
        if recorded is not None:
            found, missing = await self.resolve(
                tenant_id, instance_id, {k: int(v) for k, v in recorded.items()}
            )
            if missing:
                log.info(
                    "release %s: secrets deleted since it ran are left out: %s",
                    release_id,
                    ", ".join(missing),
                )
            return injection(found)
        found, _ = await self.resolve(tenant_id, instance_id, None)
        if release_id:
            async with self.db.session() as s:
                await s.execute(
                    update(releases)
                    .where(releases.c.id == release_id, releases.c.tenant_id == tenant_id)
                    .values(secret_versions={sec.key: sec.version for sec in found})
                )
        return injection(found)
