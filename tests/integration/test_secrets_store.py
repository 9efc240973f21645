"""Secrets against a real PostgreSQL (the network schema's own migrations): versions kept and
resolved, ciphertexts bound to their row, and a KEK rotation re-wrapped by the background loop
while every value still resolves."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import select, text, update

from libs import keys
from libs.crypto import Keyring
from libs.db import Database, make_engine, migrate
from libs.errors import PermissionDenied
from libs.outbox import Outbox
from libs.principal import Principal, system_principal
from libs.reconcile import every
from libs.settings import Settings
from services.network.models import SCHEMA, outbox, secret_versions
from services.network.secrets.domain import SecretsDomain
from services.network.secrets.peers import Owner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "network" / "migrations"
K1, K2 = b"1" * 32, b"2" * 32
USER = Principal(key_id="key_test", scope="tenant", tenant_id="ten_a")
INSTANCES = system_principal("instances")


class OnePeer:
    """The instance and tenant the secrets belong to (the e2e tests go through the real services)."""

    instances = None

    async def owner(self, caller: Principal, instance_id: str) -> Owner:
        return Owner(instance_id, "ten_a", "acct_a", "active", 0, "img")


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[Database]:
    d = Database(make_engine(database_url, pool_size=4))
    await migrate(d.engine, SCHEMA, MIGRATIONS)
    yield d
    await d.dispose()


def domain(db: Database, keyring: Keyring) -> SecretsDomain:
    return SecretsDomain(db, keyring, Outbox(outbox, db), OnePeer())  # type: ignore[arg-type]  # the stand-in has the one method used


async def test_versions_are_kept_and_resolved_current_or_as_recorded(db: Database) -> None:
    """Each set is a new version; resolve gives the current ones, or exactly the recorded ones,
    naming the recorded keys that were deleted since; a ciphertext moved to another row fails."""
    d = domain(db, Keyring({"k1": K1}, "k1"))
    await d.set(USER, "inst_v", "DB_PASSWORD", "one", "", rollout=False)
    row, _ = await d.set(USER, "inst_v", "DB_PASSWORD", "two", "", rollout=False)
    await d.set(USER, "inst_v", "cfg.json", '{"a": 1}', "file", rollout=False)
    assert row.version == 2 and row.type == "env"
    current, _ = await d.resolve(INSTANCES, "ten_a", "inst_v", {}, "")
    assert {(r.key, r.version, r.value) for r in current} == {
        ("DB_PASSWORD", 2, "two"),
        ("cfg.json", 1, '{"a": 1}'),
    }
    old, missing = await d.resolve(INSTANCES, "ten_a", "inst_v", {"DB_PASSWORD": 1, "GONE": 3}, "")
    assert [(r.key, r.version, r.value) for r in old] == [("DB_PASSWORD", 1, "one")] and missing == ["GONE"]
    only_files, _ = await d.resolve(INSTANCES, "ten_a", "inst_v", {}, "file")
    assert [r.key for r in only_files] == ["cfg.json"]
    with pytest.raises(PermissionDenied):
        await d.resolve(system_principal("databases"), "ten_a", "inst_v", {}, "")
    # Version 1's ciphertext put in version 2's place no longer decrypts (AAD = id and version).
    async with db.session() as s:
        v1 = await s.scalar(select(secret_versions.c.value_enc).where(secret_versions.c.version == 1))
        await s.execute(update(secret_versions).where(secret_versions.c.version == 2).values(value_enc=v1))
    with pytest.raises(InvalidTag):
        await d.resolve(INSTANCES, "ten_a", "inst_v", {"DB_PASSWORD": 2}, "")


async def test_kek_rotation_rewraps_in_the_background_and_values_still_resolve(db: Database) -> None:
    """Values stored under k1; the process restarts with CTRLMESH_KEK=k2 and k1 in
    CTRLMESH_KEK_PREVIOUS: old values resolve at once, and the re-wrap loop leaves no ciphertext
    naming k1 (column and blob both), after which k1 is no longer needed."""
    old = domain(db, Keyring({"k1": K1}, "k1"))
    for i in range(5):
        await old.set(USER, "inst_r", f"KEY_{i}", f"value-{i}", "", rollout=False)
    settings = Settings(
        kek=base64.b64encode(K2).decode(),
        kek_id="k2",
        kek_previous=f"k1:{base64.b64encode(K1).decode()}",
    )
    new = domain(db, keys.keyring(settings))
    before, _ = await new.resolve(INSTANCES, "ten_a", "inst_r", {}, "")
    assert sorted(r.value for r in before) == [f"value-{i}" for i in range(5)]

    loop = asyncio.create_task(every("secret re-wrap", 0.2, new.rewrap_pass, first=0))
    try:
        for _ in range(50):
            async with db.session() as s:
                left = await s.scalar(
                    text("SELECT count(*) FROM network.secret_versions WHERE kek_id <> 'k2'")
                )
            if left == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    async with db.session() as s:
        blobs = (await s.execute(select(secret_versions.c.value_enc))).scalars().all()
    assert blobs and {Keyring.key_id(b) for b in blobs} == {"k2"}
    only_k2 = domain(db, Keyring({"k2": K2}, "k2"))
    after, _ = await only_k2.resolve(INSTANCES, "ten_a", "inst_r", {}, "")
    assert sorted(r.value for r in after) == [f"value-{i}" for i in range(5)]
