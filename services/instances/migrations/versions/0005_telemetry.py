"""instances: telemetry of app instances (OTLP spans, metric points, sampled resource usage) in
day-partitioned tables, and the hashed per-instance ingest tokens

Revision ID: 0005_telemetry
Revises: 0004_release_secrets

The partitions themselves are made by the store as data arrives and dropped by its retention
loop (services/instances/otlp/store.py); indexes declared on the parents reach every partition.
"""

from alembic import op

revision = "0005_telemetry"
down_revision = "0004_release_secrets"
branch_labels = None
depends_on = None

S = "instances"


def upgrade() -> None:
    # One statement per execute: the asyncpg driver prepares each, and a prepared statement
    # holds one command.
    for statement in _DDL.split(";"):
        if statement.strip():
            op.execute(statement)


_DDL = f"""
        CREATE TABLE {S}.telemetry_tokens (
            token_hash  text PRIMARY KEY,
            instance_id text NOT NULL,
            tenant_id   text NOT NULL,
            release_id  text NOT NULL DEFAULT '',
            created_at  timestamptz NOT NULL
        );
        CREATE INDEX telemetry_tokens_instance ON {S}.telemetry_tokens (instance_id, created_at);

        CREATE TABLE {S}.telemetry_spans (
            tenant_id      text NOT NULL,
            instance_id    text NOT NULL,
            trace_id       text NOT NULL,
            span_id        text NOT NULL,
            parent_span_id text NOT NULL DEFAULT '',
            -- no parent, or a parent in another process: where /traces starts a trace
            root           boolean NOT NULL,
            name           text NOT NULL,
            kind           text NOT NULL,
            status         text NOT NULL,
            status_message text NOT NULL DEFAULT '',
            start_time     timestamptz NOT NULL,
            duration_ns    bigint NOT NULL,
            attributes     jsonb NOT NULL DEFAULT '{{}}',
            resource       jsonb NOT NULL DEFAULT '{{}}',
            scope          text NOT NULL DEFAULT ''
        ) PARTITION BY RANGE (start_time);
        CREATE INDEX telemetry_spans_roots ON {S}.telemetry_spans (instance_id, start_time DESC) WHERE root;
        CREATE INDEX telemetry_spans_trace ON {S}.telemetry_spans (instance_id, trace_id);
        CREATE INDEX telemetry_spans_server ON {S}.telemetry_spans (instance_id, start_time)
            WHERE kind = 'server';

        CREATE TABLE {S}.telemetry_points (
            tenant_id     text NOT NULL,
            instance_id   text NOT NULL,
            name          text NOT NULL,
            -- gauge | sum | histogram | exponential_histogram | summary (OTLP's data kinds)
            type          text NOT NULL,
            unit          text NOT NULL DEFAULT '',
            -- '' (gauges), 'delta' or 'cumulative'
            temporality   text NOT NULL DEFAULT '',
            monotonic     boolean NOT NULL DEFAULT false,
            attributes    jsonb NOT NULL DEFAULT '{{}}',
            resource      jsonb NOT NULL DEFAULT '{{}}',
            time          timestamptz NOT NULL,
            start_time    timestamptz,
            -- gauges and sums: the value, histograms and summaries: their sum
            value         double precision NOT NULL,
            count         bigint,
            bounds        double precision[],
            bucket_counts bigint[]
        ) PARTITION BY RANGE (time);
        CREATE INDEX telemetry_points_name ON {S}.telemetry_points (instance_id, name, time);

        CREATE TABLE {S}.telemetry_resources (
            tenant_id       text NOT NULL,
            instance_id     text NOT NULL,
            time            timestamptz NOT NULL,
            cpu_percent     double precision NOT NULL,
            memory_used_mb  integer NOT NULL,
            memory_limit_mb integer NOT NULL,
            network_in_mb   double precision NOT NULL,
            network_out_mb  double precision NOT NULL
        ) PARTITION BY RANGE (time);
        CREATE INDEX telemetry_resources_time ON {S}.telemetry_resources (instance_id, time);
"""


def downgrade() -> None:
    for t in ("telemetry_resources", "telemetry_points", "telemetry_spans", "telemetry_tokens"):
        op.execute(f"DROP TABLE IF EXISTS {S}.{t} CASCADE")
