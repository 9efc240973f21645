"""The databases schema: serverless databases, the leases the PG Gateway holds on them, and the
compute run intervals that feed CU·h billing. Rows never leave the service: the servicer maps
them to protos. The migrations (frozen once written) build these tables: 0001 the original
`databases` and the outbox, 0002 the runtime columns, leases and compute runs, 0003 the
gateways' drain reports on their leases.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

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
    # 0002: the owning account (plan limits count across an account's tenants), the tenant's
    # PostgreSQL role (created inside the compute), where the writer listens, and the last
    # measured size of the data directory.
    Column("account_id", String(64), nullable=False, server_default=""),
    Column("pg_user", String(63), nullable=False, server_default=""),
    Column("writer_host", String(255), nullable=False, server_default=""),
    Column("writer_port", Integer, nullable=False, server_default="0"),
    Column("storage_bytes", BigInteger, nullable=False, server_default="0"),
    # Why the database is in `error` (operator-facing; never shown to API clients).
    Column("last_error", Text, nullable=False, server_default=""),
    UniqueConstraint("tenant_id", "name", name="uq_databases_tenant_name"),
)

# One row per (database, Gateway process): the holder's hold on the database. A lease is live
# while `expires_at` is in the future and its `epoch` is the database's lease_control_epoch.
leases = Table(
    "leases",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("db_id", String(36), ForeignKey(f"{SCHEMA}.databases.id", ondelete="CASCADE"), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("holder_id", String(128), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("ttl_seconds", Integer, nullable=False),
    Column("active_connections", Integer, nullable=False, server_default="0"),
    Column("created_at", TS, nullable=False),
    Column("renewed_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
    # 0003: the holder's drain report during a handoff (see RenewLeaseRequest).
    Column("frozen", Boolean, nullable=False, server_default="false"),
    Column("busy_backends", Integer, nullable=False, server_default="0"),
    Column("pinned_sessions", Integer, nullable=False, server_default="0"),
    Column("checkout_waits", BigInteger, nullable=False, server_default="0"),
    UniqueConstraint("db_id", "holder_id", name="uq_leases_db_holder"),
    Index("ix_leases_db_expires", "db_id", "expires_at"),
)

# One row per interval a writer ran: CU·h = cu * (ended_at or now - started_at). Kept after the
# database is deleted (the usage happened); purged with the tenant.
compute_runs = Table(
    "compute_runs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("db_id", String(36), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("worker_id", String(64), nullable=False),
    Column("profile", String(4), nullable=False),
    Column("cu", Integer, nullable=False),
    Column("started_at", TS, nullable=False),
    Column("ended_at", TS),
    Index("ix_compute_runs_tenant", "tenant_id", "started_at"),
    Index("ix_compute_runs_open", "db_id", unique=True, postgresql_where=text("ended_at IS NULL")),
)

outbox = outbox_table(metadata)
