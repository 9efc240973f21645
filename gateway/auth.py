"""Bearer authentication at the edge: key → principal through accounts.Authenticate, cached.

The cache is keyed by a hash of the token and lives `auth_cache_ttl`; a response that carries
the `x-ctrlmesh-invalidate-key` trailer (a revocation) evicts that key's entries at once, so a
revoked key stops working on the very next request through this edge.
"""

from __future__ import annotations

import hashlib
import time

from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from libs.clients import Channels, Signer
from libs.principal import Principal

INVALIDATE_KEY = "x-ctrlmesh-invalidate-key"


class Authenticator:
    def __init__(self, channels: Channels, signer: Signer, ttl: float):
        self._channels = channels
        self._signer = signer
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, token: str) -> Principal:
        """Raises grpc.aio.AioRpcError (UNAUTHENTICATED, UNAVAILABLE) as accounts answers."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        # Channels are opened lazily, inside the server's event loop.
        stub = accounts_pb2_grpc.ApiKeyServiceStub(self._channels.get("accounts"))
        p = await stub.Authenticate(
            accounts_pb2.AuthenticateRequest(token=token), metadata=self._signer.system(), timeout=5
        )
        if len(self._cache) > 10_000:
            self._cache.clear()
        until = now + self._ttl
        if p.expires_at_unix:
            # Never serve a key from cache past its own expiry.
            until = min(until, now + (p.expires_at_unix - time.time()))
        self._cache[digest] = (until, p)
        return p

    def invalidate_key(self, key_id: str) -> None:
        for digest, (_, p) in list(self._cache.items()):
            if p.key_id == key_id:
                self._cache.pop(digest, None)
