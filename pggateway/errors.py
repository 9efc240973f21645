"""Every error a PG Gateway client can see, in one place.

Each failure is classified (the `kind`, also a metric label) the way neon's proxy does it: the
user's fault, the client going away, a quota, the control plane, the compute, or the gateway
itself. Control-plane answers (gRPC status + ErrorInfo reason) become PostgreSQL errors only in
`from_control_plane`. Messages never carry hosts, ports, SQL or exception text: the cause goes to
the log, the client gets a stable SQLSTATE and a sentence that says whether to retry.

SQLSTATE decisions (documented in the README):
- plaintext StartupMessage → 28000 "SSL required: connect with sslmode=require";
- wrong password and unknown user alike → 28P01 `password authentication failed for user "u"`;
- suspended or deleting tenant → 28000 (not retryable: an operator has to act);
- unknown database → 3D000 `database "d" does not exist`;
- database still booting after CTRLMESH_PG_WAKE_TIMEOUT, or control plane down → 57P03
  (cannot_connect_now: retry with backoff);
- compute gone mid-session → 57P01 (admin_shutdown, which drivers treat as "reconnect");
  compute unreachable at connect → 08006;
- no free backend within CTRLMESH_PG_CHECKOUT_TIMEOUT → 53300; quota or plan limit → 53400;
- the lease refused (PERMISSION_DENIED: the tenant was suspended after its credentials were
  read) → 28000.
"""

from __future__ import annotations

import grpc

from pggateway import protocol
from pggateway.controlplane import ControlPlaneError

# Failure classes.
USER = "user"
CLIENT = "client"
QUOTA = "quota"
CONTROL_PLANE = "control_plane"
COMPUTE = "compute"
GATEWAY = "gateway"


class PgError(Exception):
    """An error to send to the client as an ErrorResponse (FATAL closes the connection)."""

    def __init__(
        self, sqlstate: str, message: str, kind: str, *, severity: str = "FATAL", hint: str | None = None
    ) -> None:
        super().__init__(f"{sqlstate} {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.kind = kind
        self.severity = severity
        self.hint = hint

    def to_wire(self) -> bytes:
        return protocol.error_response(self.severity, self.sqlstate, self.message, hint=self.hint)


def ssl_required() -> PgError:
    return PgError("28000", "SSL required: connect with sslmode=require", USER)


def auth_failed(user: str) -> PgError:
    return PgError("28P01", f'password authentication failed for user "{user}"', USER)


def tenant_suspended() -> PgError:
    return PgError(
        "28000",
        "the tenant is suspended: new connections are refused",
        USER,
        hint="Ask the platform operator.",
    )


def tenant_deleting() -> PgError:
    return PgError("28000", "the tenant is being deleted: new connections are refused", USER)


def database_missing(name: str) -> PgError:
    return PgError("3D000", f'database "{name}" does not exist', USER)


def database_starting() -> PgError:
    return PgError(
        "57P03",
        "the database is starting; try again",
        COMPUTE,
        hint="The first connection after idle can take a few seconds. Retry with backoff.",
    )


def database_failed() -> PgError:
    return PgError("57P03", "the database could not be started; try again later", COMPUTE)


def database_busy_state() -> PgError:
    return PgError("57P03", "the database cannot accept connections in its current state; try again", COMPUTE)


def compute_lost() -> PgError:
    return PgError(
        "57P01", "terminating connection because the database server went away; reconnect", COMPUTE
    )


def compute_unreachable() -> PgError:
    return PgError("08006", "could not connect to the database; try again", COMPUTE)


def compute_rejected() -> PgError:
    return PgError("08004", "the database refused the gateway's connection; try again later", COMPUTE)


def checkout_timeout() -> PgError:
    return PgError("53300", "timed out waiting for a free database connection; try again", QUOTA)


def limit_exceeded() -> PgError:
    return PgError("53400", "a plan limit or quota of the tenant is exhausted", QUOTA)


def database_unavailable() -> PgError:
    return PgError("57P03", "the database is temporarily unavailable; try again", COMPUTE)


def access_denied() -> PgError:
    return PgError("28000", "access to this database is not allowed (is the tenant suspended?)", USER)


def control_plane_unavailable() -> PgError:
    return PgError("57P03", "the control plane is unavailable; try again", CONTROL_PLANE)


def shutting_down() -> PgError:
    return PgError("57P01", "the PG Gateway is shutting down; reconnect", GATEWAY)


def protocol_violation(what: str) -> PgError:
    return PgError("08P01", f"protocol violation: {what}", USER)


def unsupported(what: str) -> PgError:
    return PgError("0A000", f"{what} is not supported by the PG Gateway", USER)


def internal() -> PgError:
    return PgError("XX000", "internal error in the PG Gateway; it has been logged", GATEWAY)


# Control-plane reasons (libs.errors.REASONS) that say something specific to a database client.
_BY_REASON = {
    "LimitExceeded": limit_exceeded,
    "QuotaExceeded": limit_exceeded,
    "ProviderUnavailable": database_failed,
    "InvalidState": database_busy_state,
    # The databases service says Unavailable for "being created" and "failed to start; retry".
    "Unavailable": database_unavailable,
    "Forbidden": access_denied,
    "DeadlineExceeded": database_starting,
}
_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: control_plane_unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: database_starting,
    grpc.StatusCode.CANCELLED: control_plane_unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: limit_exceeded,
    grpc.StatusCode.FAILED_PRECONDITION: database_busy_state,
    grpc.StatusCode.ABORTED: database_busy_state,
}


def from_control_plane(err: ControlPlaneError, *, user: str, database: str, acquiring: bool) -> PgError:
    """The PostgreSQL error for a failed control-plane call.

    NOT_FOUND means "no such user" on a credentials lookup (answered like a wrong password, so
    user names cannot be probed) and "no such database" on a lease. Anything unexpected —
    including our own principal being refused, a configuration error — is an internal error.
    """
    if err.code == grpc.StatusCode.NOT_FOUND:
        return database_missing(database) if acquiring else auth_failed(user)
    if err.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) and not acquiring:
        return internal()  # our own system principal refused: a deployment error, logged
    if err.reason and err.reason in _BY_REASON and err.reason != "NotFound":
        return _BY_REASON[err.reason]()
    make = _BY_CODE.get(err.code)
    return make() if make is not None else internal()


# Errors the compute itself may answer at our login or parameter set-up, passed through because
# they describe the client's own request (a bad parameter value) rather than the platform.
_CLIENT_CLASSES = ("22", "42")


def from_compute(fields: dict[str, str]) -> PgError:
    """The error for a failed backend login or set-up, without leaking compute details."""
    sqlstate = fields.get("C", "")
    if sqlstate[:2] in _CLIENT_CLASSES:
        return PgError(sqlstate, fields.get("M", "invalid request"), USER)
    if sqlstate == "3D000":
        return PgError("3D000", fields.get("M", "database does not exist"), USER)
    if sqlstate in ("57P03", "57P01", "57P02"):
        return database_starting()
    if sqlstate == "53300":
        return PgError("53300", "the database has no free connection slots; try again", QUOTA)
    return compute_rejected()
