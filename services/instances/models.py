"""The instances schema: app instances (deployments, releases and health come with their logic)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

from libs.outbox import outbox_table

SCHEMA = "instances"
metadata = MetaData(schema=SCHEMA)
TS = DateTime(timezone=True)

instances = Table(
    "instances",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("slug", String(128), nullable=False),
    Column("provider_name", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("image", Text, nullable=False, server_default=""),
    Column("cpu_millis", Integer, nullable=False, server_default="0"),
    Column("memory_mb", Integer, nullable=False, server_default="0"),
    Column("disk_mb", Integer, nullable=False, server_default="0"),
    Column("replicas", Integer, nullable=False, server_default="1"),
    Column("spec", JSONB, nullable=False, server_default="{}"),
    Column("labels", JSONB, nullable=False, server_default="{}"),
    Column("suspended_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

outbox = outbox_table(metadata)
