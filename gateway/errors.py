"""One error mapping for the edge: gRPC status → HTTP status and the common error body
`{"error": "<Reason>", "message": "...", "details": {...}}`."""

from __future__ import annotations

from typing import Any

import grpc

from libs.errors import DEFAULT_REASON, CtrlmeshError, http_status_for
from libs.peers import decode


def body(reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": reason, "message": message, "details": details or {}}


def from_ctrlmesh(err: CtrlmeshError) -> tuple[int, dict[str, Any]]:
    from libs.errors import REASONS

    return REASONS[err.reason].http, body(err.reason, err.message, err.details)


def from_rpc_error(err: grpc.aio.AioRpcError, service: str) -> tuple[int, dict[str, Any]]:
    f = decode(err)
    code, reason, message = f.code, f.reason, f.message
    details: dict[str, Any] = dict(f.metadata)
    if f.fields:
        details["fields"] = f.fields
    if reason is None:
        reason = DEFAULT_REASON.get(code, "Internal")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Without an ErrorInfo this is gRPC's own limit, never a tenant quota (a quota always
            # carries its reason): a message over the size limit, or the server out of capacity.
            if "larger than max" in message:
                return 413, body(
                    "PayloadTooLarge",
                    "a message exceeds the gRPC message size limit; send or ask for less at once",
                )
            return 503, body("Unavailable", f"the {service} service is overloaded", {"service": service})
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message, details = f"the {service} service did not answer in time", {"service": service}
        elif code == grpc.StatusCode.UNAVAILABLE:
            message, details = f"the {service} service is unavailable", {"service": service}
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            message = "this route is not implemented yet"
        elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            # Never hand a raw failure text to the caller.
            message = "internal error"
    return http_status_for(code, reason), body(reason, message, details)
