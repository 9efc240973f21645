"""The network service's route events, written to its outbox in the transaction of the change.

Types: `route.added`, `route.updated`, `route.removed` (also when the instance is deleted, with
`reason: instance_deleted`). The payload is the route as the API shows it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.outbox import Outbox
from services.network.repository import RouteRow

ROUTE_ADDED = "route.added"
ROUTE_UPDATED = "route.updated"
ROUTE_REMOVED = "route.removed"


def snapshot(r: RouteRow) -> dict[str, Any]:
    return {
        "route_id": r.id,
        "instance_id": r.instance_id,
        "service_name": r.service_name,
        "path": r.path,
        "port": r.port,
        "protocol": r.protocol,
        "weight": r.weight,
        "strip_prefix": r.strip_prefix,
        "hostname": r.hostname,
    }


async def publish_route(outbox: Outbox, s: AsyncSession, type_: str, r: RouteRow, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="route",
        resource_id=r.id,
        data={**snapshot(r), **extra},
        tenant_id=r.tenant_id,
        account_id=r.account_id,
    )
