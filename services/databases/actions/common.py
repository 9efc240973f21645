"""What every action (and the lifecycle around them) shares about a database's compute."""

from __future__ import annotations

from typing import Any

from services.databases.compute.base import ComputeSpec
from services.databases.repository import Db

# The columns of a database whose writer is gone.
STOPPED_WRITER: dict[str, Any] = {
    "current_scale": 0,
    "worker_id": "",
    "writer_host": "",
    "writer_port": 0,
    "active_connections": 0,
}


def spec_of(db: Db) -> ComputeSpec:
    return ComputeSpec(
        db_id=db.id,
        tenant_id=db.tenant_id,
        db_name=db.name,
        role=db.pg_user,
        generation=db.lease_control_epoch,
    )
