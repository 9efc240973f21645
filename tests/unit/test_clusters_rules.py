"""The clusters service's rules that need no engine: the template catalog files, parameter
validation naming every failing field, `${param}` rendering, node status from the engine's view
and from heartbeat age, and the managed database name mapping."""

from __future__ import annotations

from datetime import timedelta

import pytest

from libs.errors import InvalidArgument
from services.clusters import templates
from services.clusters.domain import node_uuid, stale_status, status_of
from services.clusters.engines import EngineNode
from services.clusters.managed import STATUS, pg_name


def test_every_catalog_file_loads_with_a_valid_schema_and_renders_an_instance() -> None:
    """Each shipped template has a unique UUID and slug, a 2020-12 schema, and renders with its
    defaults (plus required values) into a spec with an image and no placeholder left."""
    catalog = templates.load()
    assert len(catalog) >= 3
    assert len({t.slug for t in catalog.values()}) == len(catalog)
    required = {"release": "v1", "database_name": "db"}
    for t in catalog.values():
        assert t.parameters["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        given = {k: v for k, v in required.items() if k in t.parameters.get("required", [])}
        spec = templates.render(t.spec, {**templates.validate(t, given), "name": "app"})
        assert spec["image"].startswith("ctrlmesh-test/httpd:")
        assert "${" not in repr(spec)


def test_validation_reports_every_failing_field() -> None:
    """Missing, extra, mistyped and out-of-range parameters are all named at once."""
    t = next(x for x in templates.load().values() if x.slug == "scalable-web")
    with pytest.raises(InvalidArgument) as err:
        templates.validate(t, {"replicas": 0, "memory_mb": "x", "extra": True})
    fields = err.value.details["fields"]
    assert set(fields) == {
        "parameters.release",
        "parameters.replicas",
        "parameters.memory_mb",
        "parameters.extra",
    }


def test_render_keeps_the_type_of_a_whole_placeholder_and_formats_embedded_ones() -> None:
    """`"${n}"` becomes the value itself; `"a-${n}"` its text; unknown placeholders stay."""
    out = templates.render(
        {"r": "${n}", "s": "a-${n}", "b": "${flag}", "u": "${nope}"}, {"n": 3, "flag": True}
    )
    assert out == {"r": 3, "s": "a-3", "b": True, "u": "${nope}"}


def _node(state: str) -> EngineNode:
    return EngineNode("e1", "n", "127.0.0.1", "worker", state, "active", 1.0, 512, 0)


def test_node_status_from_the_engine_and_from_missed_heartbeats() -> None:
    """ready/draining/down/not_ready from the engine's view; an unreported node turns not_ready,
    then down, as its last heartbeat ages."""
    assert status_of(_node("ready"), "active") == "ready"
    assert status_of(_node("ready"), "pause") == "draining"
    assert status_of(_node("down"), "active") == "down"
    assert status_of(_node("unknown"), "active") == "not_ready"
    nr, down = timedelta(seconds=10), timedelta(seconds=30)
    assert stale_status("ready", timedelta(seconds=3), nr, down) == "ready"
    assert stale_status("ready", timedelta(seconds=12), nr, down) == "not_ready"
    assert stale_status("draining", timedelta(seconds=31), nr, down) == "down"
    assert node_uuid("c", "e") == node_uuid("c", "e") != node_uuid("c", "f")


def test_managed_database_names_and_statuses_map() -> None:
    """`my-postgres` is the PostgreSQL database `my_postgres`; a stopped database reads ready."""
    assert pg_name("my-postgres") == "my_postgres"
    assert STATUS["stopped"] == "ready" and STATUS["creating"] == "creating" and STATUS["error"] == "error"


def test_a_binding_names_the_gateway_socket_for_local_apps_and_tcp_with_tls_otherwise() -> None:
    """Over the mounted socket: PGHOST is the mount, no TLS (libpq never uses it there), and
    DATABASE_URL is libpq's socket form; over TCP: the advertised address with sslmode=require.
    User and password are percent-encoded in the URL (a password may hold '@', '/' or ':')."""
    from datetime import UTC, datetime

    from services.clusters.managed import Connection, ManagedDatabases
    from services.clusters.repository import ManagedRow

    t = datetime.now(UTC)
    row = ManagedRow(
        id="m",
        tenant_id="ten",
        account_id="acc",
        cluster_id="c",
        name="shop-db",
        pg_name="shop_db",
        engine="postgres",
        version="16",
        db_id="m",
        app_id=None,
        state="active",
        created_at=t,
        updated_at=t,
    )
    md = ManagedDatabases.__new__(ManagedDatabases)
    md.gateway = Connection("pg.example.test", 6432, socket=True)
    local = md.connection(row, "tnt_a", "p@ss/w:rd", socket=True)
    assert local == {
        "DATABASE_URL": "postgresql://tnt_a:p%40ss%2Fw%3Ard@/shop_db?host=/run/ctrlmesh/pg&port=6432",
        "PGHOST": "/run/ctrlmesh/pg",
        "PGPORT": "6432",
        "PGUSER": "tnt_a",
        "PGPASSWORD": "p@ss/w:rd",
        "PGDATABASE": "shop_db",
        "PGSSLMODE": "disable",
    }
    remote = md.connection(row, "tnt_a", "pw", socket=False)
    assert remote["DATABASE_URL"] == "postgres://tnt_a:pw@pg.example.test:6432/shop_db?sslmode=require"
    assert remote["PGHOST"] == "pg.example.test" and remote["PGSSLMODE"] == "require"
