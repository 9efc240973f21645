"""Quota usage, stats and cascade deletes come from the services that own the resources.

The instance and network services have no public logic yet, so this test writes rows straight
into their own schemas (as their logic will) and checks that accounts sees them only through
the internal TenantResourcesService calls — and that a cascade delete purges them.
"""

import time
from datetime import UTC, datetime

import psycopg
import pytest

from libs.embedded_pg import EmbeddedPostgres
from tests.fixtures.api import unique

pytestmark = pytest.mark.e2e


def _sql(mesh, statement: str, *args) -> None:
    pg = EmbeddedPostgres(mesh.data_dir / "pg", port=int(mesh.env["CTRLMESH_EMBEDDED_PG_PORT"]))
    with psycopg.connect(pg.dsn_for("ctrlmesh"), autocommit=True) as conn:
        conn.execute(statement, args)


def test_quota_usage_counts_what_owners_hold_and_cascade_purges_it(mesh):
    """Usage = the owners' counts; delete without cascade is 409 naming them; cascade is 202 then gone."""
    c = mesh.admin()
    t = c.post("/v1/admin/tenants", json={"name": unique("own")}).json()
    tid, now = t["id"], datetime.now(UTC)
    _sql(
        mesh,
        "INSERT INTO instances.instances (id, tenant_id, name, slug, provider_name, state, cpu_millis, memory_mb, "
        "disk_mb, replicas, created_at, updated_at) VALUES (%s, %s, 'web', 'web', 'static', 'running', 500, 256, 1024, 2, %s, %s)",
        f"inst_{tid[4:]}",
        tid,
        now,
        now,
    )
    _sql(
        mesh,
        "INSERT INTO network.domains (id, tenant_id, instance_id, hostname, verify_token, created_at, updated_at) "
        "VALUES (%s, %s, 'inst_x', %s, 'tok', %s, %s)",
        f"dom_{tid[4:]}",
        tid,
        f"{tid}.example.test",
        now,
        now,
    )
    _sql(
        mesh,
        "INSERT INTO network.secrets (id, tenant_id, instance_id, key, type, version, created_at, updated_at) "
        "VALUES (%s, %s, 'inst_x', 'API_KEY', 'env', 1, %s, %s)",
        f"sec_{tid[4:]}",
        tid,
        now,
        now,
    )
    _sql(
        mesh,
        "INSERT INTO network.secret_versions (secret_id, version, tenant_id, value_enc, kek_id, created_at) "
        "VALUES (%s, 1, %s, 'x', 'k1', %s)",
        f"sec_{tid[4:]}",
        tid,
        now,
    )
    used = c.get(f"/v1/admin/tenants/{tid}/quota").json()["used"]
    assert used == {
        "instances": 1,
        "cpu_millis": 1000,
        "memory_mb": 512,
        "disk_mb": 2048,
        "domains": 1,
        "secrets": 1,
    }
    stats = c.get("/v1/admin/stats").json()
    assert stats["total_instances"] >= 1 and stats["running_instances"] >= 1

    r = c.delete(f"/v1/admin/tenants/{tid}")
    assert r.status_code == 409 and r.json()["error"] == "InvalidState"
    assert r.json()["details"] == {"instances": "1", "domains": "1", "secrets": "1"}

    r = c.delete(f"/v1/admin/tenants/{tid}", params={"cascade": "true"})
    assert r.status_code == 202 and r.json()["status"] == "deleting" and r.json()["id"] == tid
    deadline = time.monotonic() + 15
    while c.get(f"/v1/admin/tenants/{tid}").status_code != 404:
        assert time.monotonic() < deadline, "cascade delete did not finish"
        time.sleep(0.2)
    assert c.get("/v1/admin/stats").json()["total_instances"] == stats["total_instances"] - 1
