"""Audit entries for the requests the edge refuses itself.

A body too large (413), a body that is not JSON (415), a path or query that is not UTF-8 or JSON
nested too deep (400) are refused before any RPC, so the audit interceptor of the owning service
never sees them. For a route whose method has an audit rule the edge writes the entry instead,
through the same `RecordAudit` call every service's interceptor uses, signed as the edge's system
principal and naming the caller as the actor. Only refusals come here: a successful request pays
nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from opentelemetry import trace

from gateway.routes import Route
from libs.clients import Channels, Signer
from libs.errors import CtrlmeshError
from libs.interceptors import method_info
from libs.principal import Principal

log = logging.getLogger("ctrlmesh.edge.refusals")

# The refused caller waits for its answer no longer than this on a slow accounts service.
RECORD_TIMEOUT = 5.0


class Refusals:
    def __init__(self, channels: Channels, signer: Signer):
        self._channels = channels
        self._signer = signer

    def entry(
        self, route: Route, principal: Principal, params: dict[str, str], err: CtrlmeshError
    ) -> dict[str, Any] | None:
        """The audit entry of a refused call, like the interceptor's; None without an audit rule."""
        info = method_info(route.grpc_path)
        rule = info.audit
        if rule is None:
            return None
        resource_id = params.get(rule.id_field, "") if rule.id_field else params.get("id", "")
        tenant_id = principal.tenant_id
        if not tenant_id and rule.resource == "tenant" and resource_id.startswith("ten_"):
            tenant_id = resource_id
        span = trace.get_current_span().get_span_context()
        entry = {
            "tenant_id": tenant_id,
            "actor_id": principal.key_id,
            "actor_type": "api_key",
            "resource": rule.resource,
            "resource_id": resource_id,
            "action": rule.action,
            "outcome": "failure",
            "reason": err.reason,
            "service": "edge",
            "method": f"{info.service}/{info.name}",
            "trace_id": format(span.trace_id, "032x") if span.trace_id else "",
        }
        # What PostgreSQL cannot store (a NUL) becomes a visible stand-in, as in the interceptor.
        return {k: v.replace("\x00", "\\0") for k, v in entry.items()}

    async def record(
        self, route: Route, principal: Principal | None, params: dict[str, str], err: CtrlmeshError
    ) -> None:
        """Write the entry of a refused call; an unauthenticated caller is not audited (as in
        the services, where authentication runs before the audit stage)."""
        if principal is None:
            return
        entry = self.entry(route, principal, params, err)
        if entry is None:
            return
        stub = accounts_pb2_grpc.AuditServiceStub(self._channels.get("accounts"))
        try:
            await asyncio.wait_for(
                stub.RecordAudit(
                    accounts_pb2.AuditEntry(**entry), metadata=self._signer.system(), timeout=RECORD_TIMEOUT
                ),
                RECORD_TIMEOUT + 0.5,
            )
        except Exception:
            log.exception("could not record the audit entry of a refused request %s", entry)
