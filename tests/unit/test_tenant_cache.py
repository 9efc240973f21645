"""The caller-side tenant cache (libs.peers.TenantCache) and the one visibility rule
(libs/visibility.py): hits without a fetch while its event stream is live, invalidation by
accounts' events, the TTL bound, and no caching while the stream is down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from ctrlmesh.accounts.v1 import accounts_pb2
from ctrlmesh.common.v1 import common_pb2, internal_pb2

from libs.events import STREAM_HEAD
from libs.peers import TenantCache
from libs.principal import system_principal
from libs.visibility import sees

# func_only: the suite's last test also carries the session fixtures' teardown (meshes stopping).
pytestmark = pytest.mark.timeout(10, func_only=True)

T1 = accounts_pb2.Tenant(id="ten_1", name="one", account_id="acc_a", status="active")
T2 = accounts_pb2.Tenant(id="ten_2", name="two", account_id="acc_b", status="active")


def key(scope: str, account_id: str = "", tenant_id: str = "") -> common_pb2.Principal:
    return common_pb2.Principal(key_id="k", scope=scope, account_id=account_id, tenant_id=tenant_id)


def test_visibility_rule_matches_accounts_scopes():
    """Global and system see all; an account key its account's tenants; a tenant key its tenant only."""
    assert sees(key("global"), "acc_b", "ten_2") and sees(system_principal("x"), "acc_b", "ten_2")
    assert sees(key("account", "acc_a"), "acc_a", "ten_1")
    assert not sees(key("account", "acc_a"), "acc_b", "ten_2")
    assert sees(key("tenant", "acc_a", "ten_1"), "acc_a", "ten_1")
    assert not sees(key("tenant", "acc_a", "ten_1"), "acc_a", "ten_9")
    # Keys that name no account or tenant see nothing rather than everything.
    assert not sees(key("tenant", "acc_a", ""), "acc_a", "ten_1")
    assert not sees(key("account", ""), "acc_a", "ten_1")


class Stream:
    """accounts' event stream as the cache reads it: a head, then whatever the test sends."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[internal_pb2.Event | None] = asyncio.Queue()
        self.opened = 0

    async def __call__(self) -> AsyncIterator[internal_pb2.Event]:
        self.opened += 1
        yield internal_pb2.Event(id="10", type=STREAM_HEAD)
        while (ev := await self.queue.get()) is not None:
            yield ev


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_cache_hits_while_live_and_events_invalidate_at_once():
    """A tenant is fetched once; an event naming it (or its account) makes the next lookup fetch."""
    stream, clock = Stream(), Clock()
    cache = TenantCache(stream, ttl=5.0, clock=clock)
    fetched: list[str] = []

    async def fetch() -> accounts_pb2.Tenant:
        fetched.append("t")
        return T1

    await cache.tenant("ten_1", fetch)  # starts the follower; not live yet: not kept
    await settle()
    assert cache.live
    await cache.tenant("ten_1", fetch)
    assert (await cache.tenant("one", fetch)).id == "ten_1"  # by name: the same record
    await cache.tenant("ten_1", fetch)
    assert len(fetched) == 2
    await stream.queue.put(internal_pb2.Event(id="11", type="tenant.suspended", tenant_id="ten_1"))
    await settle()
    await cache.tenant("one", fetch)
    assert len(fetched) == 3
    await stream.queue.put(internal_pb2.Event(id="12", type="account.updated", account_id="acc_a"))
    await settle()
    await cache.tenant("ten_1", fetch)
    assert len(fetched) == 4
    await cache.tenant("ten_1", fetch, fresh=True)  # a write's lookup: asked anyway
    assert len(fetched) == 5
    await cache.aclose()


async def test_ttl_bounds_staleness_and_a_dropped_stream_stops_caching():
    """An entry older than the TTL is fetched again; with the stream down every lookup fetches."""
    stream, clock = Stream(), Clock()
    cache = TenantCache(stream, ttl=5.0, clock=clock)
    cache.RETRY_AFTER = 0.01
    calls = 0

    async def fetch() -> accounts_pb2.TenantLimits:
        nonlocal calls
        calls += 1
        return accounts_pb2.TenantLimits(tenant_id="ten_1", status="active")

    await cache.limits("ten_1", fetch)
    await settle()
    await cache.limits("ten_1", fetch)
    await cache.limits("ten_1", fetch)
    assert calls == 2
    await cache.limits("one", fetch)  # asked by name: kept by name, dropped by the id it names
    await stream.queue.put(internal_pb2.Event(id="11", type="quota.updated", tenant_id="ten_1"))
    await settle()
    await cache.limits("one", fetch)
    await cache.limits("ten_1", fetch)
    assert calls == 5
    calls = 2
    clock.now += 5.1
    await cache.limits("ten_1", fetch)
    assert calls == 3
    await stream.queue.put(None)  # the stream ends: accounts went away
    await settle()
    assert not cache.live
    await cache.limits("ten_1", fetch)
    await cache.limits("ten_1", fetch)
    assert calls == 5
    await asyncio.sleep(0.05)  # the follower reconnects and reads a new head
    assert cache.live and stream.opened == 2
    await cache.aclose()


async def test_a_fetch_that_raced_an_invalidation_is_not_kept():
    """An answer fetched before an event arrived may predate it: it is used once, not cached."""
    stream = Stream()
    cache = TenantCache(stream, ttl=5.0)
    await cache.tenant("ten_2", lambda: asyncio.sleep(0, T2))
    await settle()
    fetches = 0

    async def slow() -> accounts_pb2.Tenant:
        nonlocal fetches
        fetches += 1
        if fetches == 1:
            await stream.queue.put(internal_pb2.Event(id="11", type="tenant.updated", tenant_id="ten_1"))
            await settle()
        return T1

    await cache.tenant("ten_1", slow)
    await cache.tenant("ten_1", slow)
    assert fetches == 2
    await cache.tenant("ten_1", slow)
    assert fetches == 2
    await cache.aclose()
