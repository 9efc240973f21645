"""The instances repository against a real PostgreSQL: writes to tenant data take a scope, and a
scope that does not hold the row changes nothing (STYLE rule 5 for updates and deletes too)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from libs.db import Database, make_engine
from libs.timeutil import now
from services.instances import repository as repo
from services.instances.models import metadata
from services.instances.repository import Scope

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    d = Database(make_engine(database_url, pool_size=2))
    async with d.engine.begin() as conn:
        await conn.execute(text("CREATE SCHEMA IF NOT EXISTS instances"))
        await conn.run_sync(metadata.create_all)
        for t in reversed(metadata.sorted_tables):
            await conn.execute(t.delete())
    yield d
    await d.engine.dispose()


def instance(id_: str, tenant: str, account: str) -> dict[str, Any]:
    t = now()
    return {
        "id": id_,
        "tenant_id": tenant,
        "account_id": account,
        "name": id_,
        "slug": id_,
        "provider_name": "docker",
        "state": "running",
        "created_at": t,
        "updated_at": t,
    }


def deployment(id_: str, inst: str, tenant: str) -> dict[str, Any]:
    t = now()
    return {
        "id": id_,
        "tenant_id": tenant,
        "instance_id": inst,
        "release_id": "rel_1",
        "state": "running",
        "strategy": "rolling",
        "created_at": t,
        "updated_at": t,
    }


def check(id_: str, inst: str, tenant: str) -> dict[str, Any]:
    t = now()
    return {
        "id": id_,
        "tenant_id": tenant,
        "instance_id": inst,
        "name": "web",
        "type": "tcp",
        "target": "localhost:80",
        "interval_s": 30.0,
        "timeout_s": 5.0,
        "retries": 3,
        "enabled": True,
        "status": "unknown",
        "consecutive_failures": 0,
        "created_at": t,
        "updated_at": t,
    }


async def seed(db: Database) -> None:
    async with db.session() as s:
        await repo.insert_instance(s, instance("inst_a", "ten_a", "acc_a"))
        await repo.insert_instance(s, instance("inst_b", "ten_b", "acc_b"))
        await repo.insert_deployment(s, deployment("dep_b", "inst_b", "ten_b"))
        await repo.insert_check(s, check("chk_b", "inst_b", "ten_b"))


async def test_an_update_in_another_tenants_scope_changes_nothing(db: Database):
    """Tenant A's scope (or A's account) cannot stop, cancel or re-check tenant B's resources."""
    await seed(db)
    for scope in (Scope.tenant("ten_a"), Scope(account_id="acc_a")):
        async with db.session() as s:
            assert not await repo.update_instance(s, scope, "inst_b", {"desired_state": "stopped"})
            await repo.update_deployment(s, scope, "dep_b", {"cancel_requested": True})
            await repo.update_check(s, scope, "chk_b", {"status": "unhealthy"})
            await repo.delete_check(s, scope, "chk_b")
            assert await repo.in_flight_deployment(s, scope, "inst_b") is None
        async with db.session() as s:
            system = Scope.system()
            row = await repo.get_instance(s, system, "inst_b")
            dep = await repo.get_deployment(s, system, "dep_b")
            chk = await repo.get_check(s, system, "chk_b")
        assert row is not None and row.desired_state == "running"
        assert dep is not None and dep.cancel_requested is False
        assert chk is not None and chk.status == "unknown"


async def test_the_owning_tenant_and_the_system_scope_do_change_the_row(db: Database):
    """B's own scope and the reconciler's explicit system scope reach B's rows."""
    await seed(db)
    async with db.session() as s:
        assert await repo.update_instance(s, Scope.tenant("ten_b"), "inst_b", {"desired_state": "stopped"})
        await repo.update_deployment(s, Scope(account_id="acc_b"), "dep_b", {"cancel_requested": True})
        await repo.update_check(s, Scope.system(), "chk_b", {"status": "healthy"})
        in_flight = await repo.in_flight_deployment(s, Scope.tenant("ten_b"), "inst_b")
        assert in_flight is not None and in_flight.id == "dep_b"
    async with db.session() as s:
        row = await repo.get_instance(s, Scope.system(), "inst_b")
        dep = await repo.get_deployment(s, Scope.system(), "dep_b")
        chk = await repo.get_check(s, Scope.system(), "chk_b")
    assert row is not None and row.desired_state == "stopped"
    assert dep is not None and dep.cancel_requested is True
    assert chk is not None and chk.status == "healthy"
    async with db.session() as s:
        await repo.delete_instance(s, Scope.tenant("ten_a"), "inst_b")
        assert await repo.get_instance(s, Scope.system(), "inst_b") is not None
        await repo.delete_instance(s, Scope.system(), "inst_b")
        assert await repo.get_instance(s, Scope.system(), "inst_b") is None


async def test_rows_come_back_frozen_with_typed_fields_and_json_as_plain_data(db: Database):
    """An insert returns the row it wrote (server defaults filled in), reads return the same
    frozen dataclass, JSONB columns are plain dicts and lists, and a row cannot be changed in
    place (a change is a write, then a new read)."""
    async with db.session() as s:
        written = await repo.insert_instance(s, instance("inst_c", "ten_c", "acc_c"))
        dep = await repo.insert_deployment(s, deployment("dep_c", "inst_c", "ten_c"))
    async with db.session() as s:
        read = await repo.get_instance(s, Scope.tenant("ten_c"), "inst_c")
        in_flight = await repo.in_flight_deployment(s, Scope.tenant("ten_c"), "inst_c")
        # Running and caught up, but its deployment is in flight: work, named by id only.
        assert await repo.instances_needing_work(s) == ["inst_c"]
    assert isinstance(written, repo.Instance) and read == written
    assert written.desired_state == "running" and written.replicas == 1 and written.generation == 0
    assert written.spec == {} and written.labels == {} and written.endpoints == []
    assert in_flight == dep and dep.progress == {} and dep.services == [] and dep.is_rollback is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        written.state = "stopped"  # type: ignore[misc]
