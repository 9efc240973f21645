"""The instances schema: instances, releases, deployments, health checks and results, the
provider registry as last probed, and the outbox. Rows never leave the service: the servicer maps
them to protos.

Quota columns (`cpu_millis`, `memory_mb`, `disk_mb`) hold what ONE replica of the instance takes,
summed over its long-running services, so `column * replicas` is what it holds on the engine.
The main service's own resources live in `spec`.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Float, Integer, MetaData, String, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

from libs.outbox import outbox_table
from libs.reconcile import claims_table

SCHEMA = "instances"
metadata = MetaData(schema=SCHEMA)
TS = DateTime(timezone=True)

# Migration 0001 creates this table as it stood then; 0002 adds the columns after `updated_at`.
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
    # {"services": [ServiceSpec as dict, ...]}: what the current release runs, with resources.
    Column("spec", JSONB, nullable=False, server_default="{}"),
    Column("labels", JSONB, nullable=False, server_default="{}"),
    Column("suspended_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    # -- 0002 -------------------------------------------------------------------------------
    # The owning account, so account-scoped keys see the instances of all their tenants.
    Column("account_id", String(64), nullable=False, server_default=""),
    # What the reconciler drives the engine toward: "running", "stopped" or "destroyed".
    Column("desired_state", String(16), nullable=False, server_default="running"),
    # Bumped by changes the engine must apply in place (scale); the reconciler catches up.
    Column("generation", Integer, nullable=False, server_default="0"),
    Column("observed_generation", Integer, nullable=False, server_default="0"),
    Column("current_release", String(64), nullable=False, server_default=""),
    Column("endpoints", JSONB, nullable=False, server_default="[]"),
    Column("suspend_reason", String(500), nullable=False, server_default=""),
    # Why the last engine operation failed (shown in logs and events, not in the API).
    Column("last_error", Text, nullable=False, server_default=""),
    # -- 0006 -------------------------------------------------------------------------------
    # The clusters registry's cluster whose engine runs it ('' before the registry: `main`).
    Column("cluster_id", String(64), nullable=False, server_default=""),
)

releases = Table(
    "releases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    # {"services": [...], "replicas": n}: self-contained, so a rollback needs nothing else.
    Column("snapshot", JSONB, nullable=False),
    Column("notes", Text, nullable=False, server_default=""),
    Column("commit_sha", String(64), nullable=False, server_default=""),
    Column("active", Boolean, nullable=False, server_default="false"),
    Column("created_at", TS, nullable=False),
    # -- 0004_release_secrets: key → version of the secrets it ran with (secrets_client.py);
    # NULL until its first rollout.
    Column("secret_versions", JSONB, nullable=True),
)

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("release_id", String(64), nullable=False),
    # The release that was serving when the deployment started (restored on failure/cancel).
    Column("previous_release_id", String(64), nullable=False, server_default=""),
    Column("state", String(16), nullable=False),
    Column("strategy", String(16), nullable=False),
    Column("is_rollback", Boolean, nullable=False, server_default="false"),
    Column("services", JSONB, nullable=False, server_default="[]"),
    Column("progress", JSONB, nullable=False, server_default="{}"),
    Column("notes", Text, nullable=False, server_default=""),
    Column("commit_sha", String(64), nullable=False, server_default=""),
    Column("error", Text, nullable=False, server_default=""),
    Column("initiator", String(128), nullable=False, server_default=""),
    Column("cancel_requested", Boolean, nullable=False, server_default="false"),
    Column("started_at", TS),
    Column("finished_at", TS),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

health_checks = Table(
    "health_checks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("name", String(100), nullable=False),
    Column("type", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("interval_s", Float, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False),
    # The check's effective state after `retries`: "healthy", "unhealthy" or "unknown".
    Column("status", String(16), nullable=False, server_default="unknown"),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

health_results = Table(
    "health_results",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("check_id", String(64), nullable=False, index=True),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("message", Text, nullable=False, server_default=""),
    Column("status_code", Integer, nullable=False, server_default="0"),
    Column("checked_at", TS, nullable=False),
)

# The instance's aggregate health as last computed, to record transitions as events once.
instance_health = Table(
    "instance_health",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("updated_at", TS, nullable=False),
)

# The provider registry as last probed (for /v1/admin/providers and platform stats).
providers = Table(
    "providers",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("region", String(64), nullable=False, server_default=""),
    Column("healthy", Boolean, nullable=False),
    Column("message", Text, nullable=False, server_default=""),
    Column("capabilities", JSONB, nullable=False, server_default="[]"),
    Column("checked_at", TS, nullable=False),
)

# Resume points of the event streams this service consumes (accounts' tenant events).
cursors = Table(
    "cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

outbox = outbox_table(metadata)

# 0003: which process drives which instance (libs/reconcile.Claims).
reconcile_claims = claims_table(metadata)
