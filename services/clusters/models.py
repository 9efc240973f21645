"""The clusters schema (clusters, nodes and templates come with their logic)."""

from __future__ import annotations

from sqlalchemy import MetaData

from libs.outbox import outbox_table

SCHEMA = "clusters"
metadata = MetaData(schema=SCHEMA)
outbox = outbox_table(metadata)
