"""SCRAM-SHA-256 for both sides of the gateway.

Client side (gateway → compute) uses the `scramp` library. Server side (client → gateway) is
written out here against RFC 5802/7677, with `scramp` producing the verifiers we check against
(`scramp.ScramMechanism.make_auth_info`, as the accounts service does): scramp's server insists on
a non-empty SCRAM user name, but libpq, psycopg and asyncpg all send `n=` (empty), because
PostgreSQL ignores that field and authenticates the user of the startup message. So the server
half follows PostgreSQL, not scramp: the user name in the SCRAM message is ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import scramp

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096


class ScramError(Exception):
    """The exchange failed: a malformed message, a binding mismatch, or a wrong password.

    The text is for the log only; the client always gets the same 28P01.
    """


@dataclass(frozen=True)
class Verifier:
    """What PostgreSQL stores for a SCRAM password: never the password itself."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """From PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` form."""
        try:
            mech, iter_salt, keys = text.split("$")
            iterations, salt = iter_salt.split(":")
            stored, server = keys.split(":")
            if mech != SCRAM_SHA_256:
                raise ValueError(mech)
            return cls(
                int(iterations), base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server)
            )
        except ValueError as exc:
            raise ScramError(f"malformed SCRAM verifier ({exc})") from None

    @classmethod
    def from_password(cls, password: str, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
        salt, stored, server, it = scramp.ScramMechanism(SCRAM_SHA_256).make_auth_info(
            password, iteration_count=iterations
        )
        return cls(it, salt, stored, server)

    @classmethod
    def decoy(cls, secret: bytes, user: str) -> Verifier:
        """A verifier no password matches, stable per user name, so an unknown user is walked
        through the same exchange (same salt every time) as a known one and gets the same error."""
        digest = hmac.new(secret, b"decoy|" + user.encode(), hashlib.sha256).digest()
        return cls(DEFAULT_ITERATIONS, digest[:16], secrets.token_bytes(32), secrets.token_bytes(32))

    def text(self) -> str:
        b64 = base64.b64encode
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )


def _attrs(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError("malformed SCRAM attribute")
        out.append((part[0], part[2:]))
    return out


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ScramError("malformed base64 in SCRAM message") from None


class ScramServer:
    """One server-side SCRAM exchange.

    `channel_binding` is the tls-server-end-point hash of our certificate; when set we advertise
    SCRAM-SHA-256-PLUS, and a client that says it supports binding but thinks we do not (`y`) is
    refused, as RFC 5802 requires to stop a downgrade.
    """

    def __init__(self, mechanism: str, verifier: Verifier, channel_binding: bytes | None) -> None:
        if mechanism not in (SCRAM_SHA_256, SCRAM_SHA_256_PLUS):
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        if mechanism == SCRAM_SHA_256_PLUS and channel_binding is None:
            raise ScramError("channel binding requested without TLS")
        self.mechanism = mechanism
        self.verifier = verifier
        self.channel_binding = channel_binding
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._server_signature = b""

    def server_first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode()
        except UnicodeDecodeError:
            raise ScramError("SCRAM message is not UTF-8") from None
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed client-first-message")
        flag, authzid, bare = parts
        if authzid:
            raise ScramError("authorization identities are not supported")
        if flag.startswith("p="):
            if self.mechanism != SCRAM_SHA_256_PLUS:
                raise ScramError("channel binding used with the non-PLUS mechanism")
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise ScramError(f"unsupported channel binding type {flag[2:]!r}")
        elif flag == "y":
            if self.channel_binding is not None:
                raise ScramError("client thinks the server cannot bind the channel, but it can (downgrade)")
        elif flag == "n":
            if self.mechanism == SCRAM_SHA_256_PLUS:
                raise ScramError("SCRAM-SHA-256-PLUS chosen without channel binding")
        else:
            raise ScramError("malformed GS2 header")
        attrs = _attrs(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise ScramError("malformed client-first-message-bare")
        if any(k == "m" for k, _ in attrs):
            raise ScramError("mandatory SCRAM extensions are not supported")
        self._gs2_header = f"{flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = attrs[1][1] + base64.b64encode(secrets.token_bytes(18)).decode()
        v = self.verifier
        self._server_first = f"r={self._nonce},s={base64.b64encode(v.salt).decode()},i={v.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """Verify the proof; the server-final-message on success, ScramError otherwise."""
        try:
            text = client_final.decode()
        except UnicodeDecodeError:
            raise ScramError("SCRAM message is not UTF-8") from None
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message has no proof")
        attrs = dict(_attrs(head))
        expected_cb = self._gs2_header.encode()
        if self._gs2_header.startswith("p="):
            assert self.channel_binding is not None
            expected_cb += self.channel_binding
        if not hmac.compare_digest(_b64decode(attrs.get("c", "")), expected_cb):
            raise ScramError("channel binding data does not match")
        if attrs.get("r") != self._nonce:
            raise ScramError("nonce does not match")
        proof = _b64decode(proof_b64)
        auth_message = f"{self._client_first_bare},{self._server_first},{head}".encode()
        v = self.verifier
        client_signature = hmac.new(v.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(client_signature):
            raise ScramError("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise ScramError("wrong password")
        self._server_signature = hmac.new(v.server_key, auth_message, hashlib.sha256).digest()
        return b"v=" + base64.b64encode(self._server_signature)


class ScramClient:
    """The gateway logging in to a compute: scramp's client, without channel binding (the
    compute link is the internal network's plain TCP)."""

    def __init__(self, mechanisms: list[str], user: str, password: str) -> None:
        if SCRAM_SHA_256 not in mechanisms:
            raise ScramError(f"the compute offers no usable SASL mechanism: {mechanisms}")
        # PostgreSQL ignores the SCRAM user name, but scramp requires one.
        self._client = scramp.ScramClient([SCRAM_SHA_256], user or "user", password)
        self.mechanism = SCRAM_SHA_256

    def client_first(self) -> bytes:
        return str(self._client.get_client_first()).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            self._client.set_server_first(server_first.decode())
            return str(self._client.get_client_final()).encode()
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None

    def verify_server(self, server_final: bytes) -> None:
        try:
            self._client.set_server_final(server_final.decode())
        except scramp.ScramException as exc:
            raise ScramError(str(exc)) from None
