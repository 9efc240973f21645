"""The clusters schema: the registry of engines (clusters), the nodes polled from them, and the
Zectre managed databases (each a pointer at a serverless database of the databases service plus
its binding). Templates are files (services/clusters/templates/), not rows. Rows never leave the
service: the servicer maps them to protos. Migrations (frozen once written): 0001 the outbox,
0002 these tables, 0003 the intents.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

from libs.outbox import outbox_table

SCHEMA = "clusters"
metadata = MetaData(schema=SCHEMA)
outbox = outbox_table(metadata)
TS = DateTime(timezone=True)

clusters = Table(
    "clusters",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(63), nullable=False, unique=True),
    # "local", "self_managed" ("managed" is refused until a managed backend exists).
    Column("type", String(16), nullable=False),
    Column("description", Text),
    Column("config", JSONB, nullable=False),
    # The engine the cluster's nodes are read from (a DOCKER_HOST).
    Column("endpoint", String(2048), nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("cluster_id", String(36), ForeignKey(f"{SCHEMA}.clusters.id", ondelete="CASCADE"), nullable=False),
    Column("engine_id", String(128), nullable=False),
    Column("name", String(255), nullable=False),
    Column("address", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    # Ours: "active", "pause" or "drain" (on a swarm also written to the engine).
    Column("availability", String(8), nullable=False, server_default="active"),
    # What the engine last said of the node: "ready", "down", "unknown", ...
    Column("engine_state", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("cpu", Float, nullable=False, server_default="0"),
    Column("memory_mb", Integer, nullable=False, server_default="0"),
    Column("running_tasks", Integer, nullable=False, server_default="0"),
    Column("labels", JSONB, nullable=False),
    Column("last_heartbeat_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("cluster_id", "engine_id", name="uq_nodes_engine"),
)

managed_databases = Table(
    "managed_databases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("cluster_id", String(36), ForeignKey(f"{SCHEMA}.clusters.id"), nullable=False),
    # The display name and the PostgreSQL database it maps to (connection_database).
    Column("name", String(63), nullable=False),
    Column("pg_name", String(63), nullable=False),
    Column("engine", String(16), nullable=False),
    Column("version", String(16), nullable=False),
    # The backing databases.v1 database.
    Column("db_id", String(36), nullable=False),
    # The bound instance: one app per database.
    Column("app_id", String(64)),
    # "active" or "deleting" (the backing database's own state gives the rest).
    Column("state", String(16), nullable=False, server_default="active"),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("tenant_id", "pg_name", name="uq_managed_databases_name"),
    Index("ix_managed_databases_app", "app_id"),
)

# The journal of operations that span services (a managed database's backing database, a
# template's app and database): written before the first remote step, deleted in the
# transaction that records the outcome. A row left behind is an operation its process died in;
# the next start undoes what it made (services/clusters/intents.py).
intents = Table(
    "intents",
    metadata,
    Column("id", String(64), primary_key=True),
    # "managed_create" or "instantiate"
    Column("kind", String(32), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    # The app an instantiation makes (its name is known before the call that creates it).
    Column("app_name", String(255)),
    Column("app_id", String(64)),
    # The backing database of a managed database, by its name in the tenant.
    Column("pg_name", String(63)),
    Column("created_at", TS, nullable=False),
)
