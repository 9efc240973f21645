"""libs.peers: the one translation of a failed internal call, as every service, the edge and the
PG Gateway read it."""

from __future__ import annotations

import grpc
import pytest

from libs.errors import CtrlmeshError, InvalidArgument, InvalidState, NotFound, PermissionDenied, Unavailable
from libs.grpc_server import status_details
from libs.peers import decode, to_ctrlmesh


def _rpc_error(code: grpc.StatusCode, details: str, err: CtrlmeshError | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if err is not None:
        trailing.add("grpc-status-details-bin", status_details(err))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def test_not_found_is_the_one_not_found_answer_naming_what_was_looked_up() -> None:
    """NOT_FOUND from a peer becomes `not_found(kind, ident)`: the same text for a missing and an
    invisible resource, whatever the peer said."""
    err = to_ctrlmesh(
        _rpc_error(grpc.StatusCode.NOT_FOUND, "tenant 'x' of account y"),
        "accounts",
        kind="tenant",
        ident="t1",
    )
    assert isinstance(err, NotFound)
    assert err.message == "tenant 't1' not found"


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (PermissionDenied("the tenant is suspended"), PermissionDenied),
        (InvalidState("writer is running"), InvalidState),
        (InvalidArgument("bad name", fields={"name": "too long"}), InvalidArgument),
    ],
)
def test_a_reasoned_refusal_keeps_its_class_reason_and_details(exc: CtrlmeshError, cls: type) -> None:
    """A refusal with a catalogued reason crosses the process boundary as the same error class,
    message and field details."""
    got = to_ctrlmesh(_rpc_error(exc.code, exc.message, exc), "databases")
    assert type(got) is cls
    assert got.reason == exc.reason and got.message == exc.message
    if isinstance(exc, InvalidArgument):
        assert isinstance(got, InvalidArgument) and got.fields == {"name": "too long"}


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    ],
)
def test_anything_else_is_the_peer_unavailable_never_its_raw_text(code: grpc.StatusCode) -> None:
    """Transport failures, deadlines and internal errors are `Unavailable` naming the service;
    the peer's own text (which may hold hosts or stack traces) is not passed on."""
    got = to_ctrlmesh(_rpc_error(code, "connect to 10.0.0.3:7001 failed: Traceback ..."), "accounts")
    assert isinstance(got, Unavailable)
    assert got.message == "the accounts service is unavailable" and got.details == {"service": "accounts"}


def test_a_reason_whose_code_does_not_match_is_not_trusted() -> None:
    """An ErrorInfo reason that the catalogue gives another code is ignored (Unavailable)."""
    exc = PermissionDenied("no")
    got = to_ctrlmesh(_rpc_error(grpc.StatusCode.INTERNAL, "no", exc), "instances")
    assert isinstance(got, Unavailable)


def test_decode_reads_reason_metadata_and_fields_and_survives_garbage() -> None:
    """decode() returns code, text, reason and fields; undecodable status details are ignored."""
    f = decode(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad", InvalidArgument("bad", fields={"a": "b"})))
    assert (f.code, f.message, f.reason, f.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        "BadRequest",
        {"a": "b"},
    )
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\xfe not a status"))
    f = decode(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, "down"))
    assert f.reason is None and f.code == grpc.StatusCode.UNAVAILABLE
