"""The clusters service's events, written to its outbox in the transaction of the change.

Types: `cluster.registered`, `node.status_changed` (with `previous_status`), `node.drained`
(with `migrate`), `node.undrained`, `managed_database.created`, `managed_database.bound`
(with `app_id`), `managed_database.deleted`, `template.instantiated` (with the app, deployment
and managed database ids). Platform events (clusters, nodes) belong to no tenant: only global
watchers see them; managed-database and template events carry their tenant and account.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.outbox import Outbox
from services.clusters.repository import ClusterRow, ManagedRow, NodeRow

CLUSTER_REGISTERED = "cluster.registered"
NODE_STATUS_CHANGED = "node.status_changed"
NODE_DRAINED = "node.drained"
NODE_UNDRAINED = "node.undrained"
MANAGED_CREATED = "managed_database.created"
MANAGED_BOUND = "managed_database.bound"
MANAGED_DELETED = "managed_database.deleted"
TEMPLATE_INSTANTIATED = "template.instantiated"


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def snapshot(row: ClusterRow | NodeRow | ManagedRow) -> dict[str, Any]:
    return {k: _json(v) for k, v in asdict(row).items()}


async def publish(
    outbox: Outbox,
    s: AsyncSession,
    type_: str,
    resource: str,
    resource_id: str,
    data: dict[str, Any],
    *,
    tenant_id: str = "",
    account_id: str = "",
) -> None:
    await outbox.publish(
        s,
        type_,
        resource=resource,
        resource_id=resource_id,
        data=data,
        tenant_id=tenant_id,
        account_id=account_id,
    )
