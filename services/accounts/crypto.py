"""The secrets accounts mints: API-key tokens (checksummed, stored only as a digest) and tenant
PostgreSQL credentials (a password and its SCRAM-SHA-256 verifier)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
import zlib

from scramp import ScramMechanism

_B62 = string.digits + string.ascii_letters
TOKEN_PREFIX = "cmk_"


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def new_token() -> str:
    """`cmk_` + 30 random base62 characters + a 6-character CRC32 checksum of them.

    The checksum lets the edge reject typos and junk without touching the database.
    """
    body = "".join(secrets.choice(_B62) for _ in range(30))
    return f"{TOKEN_PREFIX}{body}{_b62(zlib.crc32(body.encode()), 6)}"


def token_well_formed(token: str) -> bool:
    if not token.startswith(TOKEN_PREFIX) or len(token) != len(TOKEN_PREFIX) + 36:
        return False
    body, check = token[len(TOKEN_PREFIX) : -6], token[-6:]
    return hmac.compare_digest(_b62(zlib.crc32(body.encode()), 6), check)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_password() -> str:
    return secrets.token_urlsafe(24)


def new_pg_user() -> str:
    return "tnt_" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier format, which the PG Gateway authenticates against."""
    salt, stored, server, it = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${it}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"
