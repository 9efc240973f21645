"""The error model, the principal signature and envelope encryption."""

import time

import grpc
import pytest

from libs import principal as principals
from libs.crypto import Keyring
from libs.errors import HTTP_STATUS, REASONS, InvalidArgument, Unauthenticated, http_status_for
from libs.grpc_server import status_details


def test_every_reason_maps_to_its_documented_http_status():
    """Each reason's HTTP status is the one ROUTES.md gives (409 for InvalidState/LimitExceeded)."""
    expected = {
        "BadRequest": 400,
        "Unauthorized": 401,
        "Forbidden": 403,
        "OperationDisabled": 403,
        "NotFound": 404,
        "Conflict": 409,
        "InvalidState": 409,
        "LimitExceeded": 409,
        "VerificationFailed": 409,
        "QuotaExceeded": 429,
        "ProviderUnavailable": 503,
        "Unavailable": 503,
        "Internal": 500,
        "NotImplemented": 501,
    }
    for name, status in expected.items():
        r = REASONS[name]
        assert http_status_for(r.code, name) == status, name


def test_grpc_gateway_table_for_statuses_without_reason():
    """A bare gRPC status follows grpc-gateway's table."""
    assert HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert http_status_for(grpc.StatusCode.FAILED_PRECONDITION, None) == 400
    assert http_status_for(grpc.StatusCode.CANCELLED, None) == 499
    assert http_status_for(grpc.StatusCode.DEADLINE_EXCEEDED, None) == 504


def test_status_details_carry_reason_and_field_violations():
    """The serialized google.rpc.Status holds an ErrorInfo reason and a BadRequest."""
    from google.rpc import error_details_pb2, status_pb2

    st = status_pb2.Status.FromString(status_details(InvalidArgument("bad", fields={"name": "too short"})))
    info, br = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert st.details[0].Unpack(info) and info.reason == "BadRequest"
    assert st.details[1].Unpack(br) and br.field_violations[0].field == "name"


def test_principal_signature_roundtrip_and_tampering():
    """A signed principal verifies; a changed payload, signature or secret does not."""
    p = principals.Principal(key_id="key_x", scope="tenant", tenant_id="ten_y")
    md = principals.sign(p, b"s" * 32)
    assert principals.verify(md, b"s" * 32) == p
    with pytest.raises(Unauthenticated):
        principals.verify(md, b"t" * 32)
    forged = [
        (k, principals.Principal(key_id="key_x", scope="global").SerializeToString())
        if k == principals.PRINCIPAL_KEY
        else (k, v)
        for k, v in md
    ]
    with pytest.raises(Unauthenticated):
        principals.verify(forged, b"s" * 32)
    with pytest.raises(Unauthenticated):
        principals.verify([], b"s" * 32)


def test_stale_principal_is_rejected(monkeypatch):
    """A principal signed long ago cannot be replayed."""
    p = principals.Principal(key_id="key_x", scope="global")
    md = principals.sign(p, b"k" * 32)
    monkeypatch.setattr(
        time, "time", lambda: float(dict(md)[principals.ISSUED_KEY]) + principals.MAX_AGE_SECONDS + 5
    )
    with pytest.raises(Unauthenticated, match="expired"):
        principals.verify(md, b"k" * 32)


def test_envelope_encryption_roundtrip_rotation_and_aad():
    """Ciphertexts decrypt with their KEK id after rotation, and are bound to their AAD."""
    old = Keyring({"k1": b"a" * 32}, "k1")
    blob = old.encrypt_str("s3cret", aad="ten_1")
    rotated = Keyring({"k1": b"a" * 32, "k2": b"b" * 32}, "k2")
    assert rotated.decrypt_str(blob, aad="ten_1") == "s3cret"
    assert rotated.encrypt_str("x") != rotated.encrypt_str("x")  # fresh data key and nonce each time
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):
        rotated.decrypt_str(blob, aad="ten_2")
    with pytest.raises(ValueError, match="unknown KEK"):
        Keyring({"k2": b"b" * 32}, "k2").decrypt_str(blob, aad="ten_1")
