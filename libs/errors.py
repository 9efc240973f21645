"""The error model: one exception class per canonical gRPC code, one catalogue of reasons.

Domain code raises these; the error interceptor turns them into `google.rpc.Status` with an
`ErrorInfo(reason=…)` (and a `BadRequest` for field violations); the edge turns that status into
HTTP with the single table in `HTTP_STATUS`. Anything else raised is INTERNAL with a fixed
message: its cause goes to the log with the trace id, never to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

# The trailing-metadata key of the serialized google.rpc.Status (gRPC's rich error model).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Reason:
    name: str
    code: grpc.StatusCode
    http: int
    retryable: bool
    doc: str


# The reasons catalogue: the `error` field of every HTTP error body is one of these names.
REASONS: dict[str, Reason] = {
    r.name: r
    for r in (
        Reason(
            "BadRequest",
            grpc.StatusCode.INVALID_ARGUMENT,
            400,
            False,
            "The request is malformed or fails validation; see details.fields.",
        ),
        Reason(
            "Unauthorized",
            grpc.StatusCode.UNAUTHENTICATED,
            401,
            False,
            "No API key, or the key is unknown, revoked or expired.",
        ),
        Reason(
            "Forbidden",
            grpc.StatusCode.PERMISSION_DENIED,
            403,
            False,
            "The key's scope or permissions do not allow this operation.",
        ),
        Reason(
            "OperationDisabled",
            grpc.StatusCode.PERMISSION_DENIED,
            403,
            False,
            "The operation is disabled in the managed contract.",
        ),
        Reason(
            "NotFound",
            grpc.StatusCode.NOT_FOUND,
            404,
            False,
            "No such resource, or it is not visible to this key.",
        ),
        Reason(
            "Conflict",
            grpc.StatusCode.ALREADY_EXISTS,
            409,
            False,
            "The resource already exists or conflicts with another.",
        ),
        Reason(
            "InvalidState",
            grpc.StatusCode.FAILED_PRECONDITION,
            409,
            False,
            "The resource's current state does not allow this operation.",
        ),
        Reason(
            "VerificationFailed",
            grpc.StatusCode.FAILED_PRECONDITION,
            409,
            False,
            "A domain's DNS record was not found or does not hold its token; details say what was.",
        ),
        Reason(
            "LimitExceeded",
            grpc.StatusCode.FAILED_PRECONDITION,
            409,
            False,
            "A plan limit would be exceeded.",
        ),
        Reason(
            "QuotaExceeded",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            429,
            False,
            "A tenant quota would be exceeded.",
        ),
        Reason(
            "ProviderUnavailable",
            grpc.StatusCode.UNAVAILABLE,
            503,
            True,
            "The engine behind this resource does not answer.",
        ),
        Reason(
            "Unavailable",
            grpc.StatusCode.UNAVAILABLE,
            503,
            True,
            "A ctrlmesh service or dependency is down; retry later.",
        ),
        Reason(
            "DeadlineExceeded",
            grpc.StatusCode.DEADLINE_EXCEEDED,
            504,
            True,
            "The operation did not finish in time.",
        ),
        Reason(
            "Internal",
            grpc.StatusCode.INTERNAL,
            500,
            True,
            "An unexpected error; it has been logged with the trace id.",
        ),
        Reason("NotImplemented", grpc.StatusCode.UNIMPLEMENTED, 501, False, "This route has no logic yet."),
        # The edge's own refusals, before any service is called; their codes are the nearest gRPC
        # ones, so a service raising one maps to the same HTTP status.
        Reason(
            "MethodNotAllowed",
            grpc.StatusCode.UNIMPLEMENTED,
            405,
            False,
            "The path exists under other methods; the `Allow` header lists them.",
        ),
        Reason(
            "PayloadTooLarge",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            413,
            False,
            "The request body, or a message on its way, exceeds the size limit.",
        ),
        Reason(
            "UnsupportedMediaType",
            grpc.StatusCode.INVALID_ARGUMENT,
            415,
            False,
            "A request body must be JSON (`Content-Type: application/json`).",
        ),
    )
}

ERROR_DOMAIN = "ctrlmesh.dev"

# grpc-gateway's table, with our 409s for FAILED_PRECONDITION reasons (ROUTES.md).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# The reason the edge reports when a status carries none (e.g. a raw gRPC failure).
DEFAULT_REASON: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "BadRequest",
    grpc.StatusCode.OUT_OF_RANGE: "BadRequest",
    grpc.StatusCode.FAILED_PRECONDITION: "BadRequest",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthorized",
    grpc.StatusCode.PERMISSION_DENIED: "Forbidden",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "Conflict",
    grpc.StatusCode.ABORTED: "Conflict",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "QuotaExceeded",
    grpc.StatusCode.UNIMPLEMENTED: "NotImplemented",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.CANCELLED: "Unavailable",
}


def http_status_for(code: grpc.StatusCode, reason: str | None) -> int:
    if reason and reason in REASONS and REASONS[reason].code == code:
        return REASONS[reason].http
    return HTTP_STATUS.get(code, 500)


class CtrlmeshError(Exception):
    """Base of every error a service answers on purpose."""

    reason: str = "Internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if reason is not None:
            if reason not in REASONS:
                raise ValueError(f"unknown reason {reason!r}")
            self.reason = reason

    @property
    def code(self) -> grpc.StatusCode:
        return REASONS[self.reason].code


class InvalidArgument(CtrlmeshError):
    reason = "BadRequest"

    def __init__(self, message: str, *, fields: dict[str, str] | None = None):
        super().__init__(message, details={"fields": fields or {}})
        self.fields = fields or {}


class Unauthenticated(CtrlmeshError):
    reason = "Unauthorized"


class PermissionDenied(CtrlmeshError):
    reason = "Forbidden"


class OperationDisabled(CtrlmeshError):
    reason = "OperationDisabled"


class NotFound(CtrlmeshError):
    reason = "NotFound"


class AlreadyExists(CtrlmeshError):
    reason = "Conflict"


class InvalidState(CtrlmeshError):
    reason = "InvalidState"


class LimitExceeded(CtrlmeshError):
    reason = "LimitExceeded"


class VerificationFailed(CtrlmeshError):
    reason = "VerificationFailed"


class QuotaExceeded(CtrlmeshError):
    reason = "QuotaExceeded"


class Unavailable(CtrlmeshError):
    reason = "Unavailable"


class ProviderUnavailable(CtrlmeshError):
    reason = "ProviderUnavailable"


class Internal(CtrlmeshError):
    reason = "Internal"


class DeadlineExceeded(CtrlmeshError):
    reason = "DeadlineExceeded"


class PayloadTooLarge(CtrlmeshError):
    reason = "PayloadTooLarge"


class UnsupportedMediaType(CtrlmeshError):
    reason = "UnsupportedMediaType"


def not_found(kind: str, ident: str) -> NotFound:
    """The one NOT_FOUND message, identical for a missing and an invisible resource."""
    return NotFound(f"{kind} {ident!r} not found", details={"resource": kind})


def from_reason(reason: str, message: str, details: dict[str, Any] | None = None) -> CtrlmeshError:
    """The error of a catalogued reason as its own class (so `except NotFound` still catches a
    refusal that crossed a process boundary)."""
    details = dict(details or {})
    if reason == InvalidArgument.reason:
        return InvalidArgument(message, fields=details.get("fields") or {})
    for cls in CtrlmeshError.__subclasses__():
        if cls.reason == reason and cls is not InvalidArgument:
            return cls(message, details=details)
    return CtrlmeshError(message, details=details, reason=reason)
