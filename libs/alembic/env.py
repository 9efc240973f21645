"""Shared Alembic environment: every service's migrations/env.py runs this.

The connection and schema come from `libs.db.migrate`; the version table lives in the service's
own schema so services migrate independently.
"""

from __future__ import annotations

from alembic import context


def run() -> None:
    cfg = context.config
    conn = cfg.attributes["connection"]
    schema = cfg.attributes["schema"]
    context.configure(
        connection=conn,
        version_table_schema=schema,
        include_schemas=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()
