"""The databases schema: serverless databases (the compute driver and leases come with their logic)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, String, Table, UniqueConstraint

from libs.outbox import outbox_table

SCHEMA = "databases"
metadata = MetaData(schema=SCHEMA)
TS = DateTime(timezone=True)

databases = Table(
    "databases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("name", String(63), nullable=False),
    Column("size", String(4), nullable=False),
    Column("state", String(16), nullable=False),
    Column("timeline", String(32), nullable=False),
    Column("worker_id", String(64), nullable=False, server_default=""),
    Column("active_connections", Integer, nullable=False, server_default="0"),
    Column("last_used_at", TS),
    Column("current_scale", Integer, nullable=False, server_default="0"),
    Column("target_scale", Integer, nullable=False, server_default="0"),
    Column("current_profile", String(4), nullable=False),
    Column("target_profile", String(4), nullable=False),
    Column("candidate_profile", String(4)),
    Column("candidate_worker_id", String(64)),
    Column("candidate_writer_term", BigInteger),
    Column("scale_state", String(16), nullable=False, server_default="STEADY"),
    Column("freeze_new_checkouts", Boolean, nullable=False, server_default="false"),
    Column("lease_control_epoch", BigInteger, nullable=False, server_default="0"),
    Column("autoscale_cooldown_until", TS),
    Column("scale_phase_started_at", TS),
    Column("scale_phase_deadline_at", TS),
    Column("scale_failure_reason", String(200)),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("tenant_id", "name", name="uq_databases_tenant_name"),
)

outbox = outbox_table(metadata)
