"""The principal: who is calling, carried between processes as signed gRPC metadata.

The edge authenticates the bearer key once (accounts.Authenticate) and forwards the resulting
`Principal` with an HMAC-SHA256 signature made with the internal secret every process shares.
Services verify it in the auth interceptor and trust nothing else: a missing, forged, altered or
stale principal is UNAUTHENTICATED. Service-to-service calls carry a `system` principal.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import time
from collections.abc import Sequence

from ctrlmesh.common.v1 import common_pb2

from libs.errors import Unauthenticated

PRINCIPAL_KEY = "x-ctrlmesh-principal-bin"
SIGNATURE_KEY = "x-ctrlmesh-principal-sig"
ISSUED_KEY = "x-ctrlmesh-principal-ts"
# A signed principal is good for this long; long streams are checked when they open.
MAX_AGE_SECONDS = 300

SYSTEM_SCOPE = "system"

Principal = common_pb2.Principal

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def system_principal(service: str) -> Principal:
    return Principal(key_id=f"system:{service}", scope=SYSTEM_SCOPE)


def _mac(secret: bytes, payload: bytes, issued: str) -> str:
    return hmac.new(secret, payload + b"|" + issued.encode(), hashlib.sha256).hexdigest()


def sign(principal: Principal, secret: bytes) -> list[tuple[str, str | bytes]]:
    payload = principal.SerializeToString(deterministic=True)
    issued = str(int(time.time()))
    return [(PRINCIPAL_KEY, payload), (ISSUED_KEY, issued), (SIGNATURE_KEY, _mac(secret, payload, issued))]


def verify(metadata: Sequence[tuple[str, str | bytes]] | None, secret: bytes) -> Principal:
    md = dict(metadata or ())
    payload, issued, sig = md.get(PRINCIPAL_KEY), md.get(ISSUED_KEY), md.get(SIGNATURE_KEY)
    if not isinstance(payload, bytes) or not isinstance(issued, str) or not isinstance(sig, str):
        raise Unauthenticated("missing principal")
    if not hmac.compare_digest(_mac(secret, payload, issued), sig):
        raise Unauthenticated("principal signature does not match")
    try:
        age = time.time() - int(issued)
    except ValueError:
        raise Unauthenticated("malformed principal timestamp") from None
    if age > MAX_AGE_SECONDS or age < -60:
        raise Unauthenticated("principal expired")
    return Principal.FromString(payload)


def current() -> Principal:
    """The verified principal of the RPC being served (set by the auth interceptor)."""
    p = _current.get()
    if p is None:
        raise Unauthenticated("no principal in context")
    return p


def set_current(p: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(p)


def reset_current(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)


def is_system(p: Principal) -> bool:
    return p.scope == SYSTEM_SCOPE


def is_global(p: Principal) -> bool:
    return p.scope in ("global", SYSTEM_SCOPE)
