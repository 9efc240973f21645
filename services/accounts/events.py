"""/v2/events: accounts' own outbox and the databases service's, merged into one resumable stream.

Each event's id is the position in both streams after it, `<accounts seq>.<databases seq>`
(e.g. `41.7`); the SSE `id:` line carries it, and Last-Event-ID resumes both streams exactly.
A bare `<accounts seq>` (an id from before the merge, or sent while the databases service was
unreachable) resumes the databases events from now. Databases events are filtered to the
caller's visibility by the databases service itself (account or tenant of the key).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from ctrlmesh.common.v1 import internal_pb2
from google.protobuf import struct_pb2, timestamp_pb2

from libs.errors import InvalidArgument
from libs.principal import Principal

log = logging.getLogger("ctrlmesh.accounts.events")

DATABASE_PREFIX = "database."
STREAM_HEAD = "stream.head"
# How long a fresh stream waits for the databases position before going on without it.
HEAD_WAIT = 2.0


def parse_event_id(value: str) -> tuple[int | None, int | None]:
    """(accounts seq, databases seq) of a Last-Event-ID; None where absent."""
    if not value:
        return None, None
    head, _, tail = value.partition(".")
    try:
        return int(head), (int(tail) if tail else None)
    except ValueError:
        raise InvalidArgument(
            "last_event_id is not an event id", fields={"last_event_id": "not an event id"}
        ) from None


def event_id(accounts_seq: int, databases_seq: int | None) -> str:
    return str(accounts_seq) if databases_seq is None else f"{accounts_seq}.{databases_seq}"


def _from_row(row: dict[str, Any]) -> internal_pb2.Event:
    data = struct_pb2.Struct()
    data.update(row["data"])
    time = timestamp_pb2.Timestamp()
    time.FromDatetime(row["created_at"])
    return internal_pb2.Event(
        type=row["type"],
        tenant_id=row["tenant_id"],
        resource=row["resource"],
        resource_id=row["resource_id"],
        data=data,
        time=time,
    )


async def watch(
    domain: Any, p: Principal, last_event_id: str, types: list[str]
) -> AsyncIterator[internal_pb2.Event]:
    """The merged stream for principal `p` (see the module docstring)."""
    a_after, d_after = parse_event_id(last_event_id)
    if a_after is None:
        a_after = await domain.outbox.last_seq()
    want_databases = not types or any(t.startswith(DATABASE_PREFIX) for t in types)
    queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue(maxsize=1000)
    head = asyncio.Event()

    async def accounts_events() -> None:
        try:
            await asyncio.wait_for(head.wait(), HEAD_WAIT)
        except TimeoutError:
            pass
        try:
            async for row in domain.outbox.watch(a_after, domain.event_filter(p, types)):
                await queue.put(("a", row["seq"], _from_row(row)))
        except Exception as err:
            await queue.put(("x", 0, err))

    async def databases_events() -> None:
        pos = d_after
        scope = {"account_id": p.account_id} if p.scope == "account" else {}
        if p.scope == "tenant":
            scope = {"tenant_id": p.tenant_id}
        db_types = [t for t in types if t.startswith(DATABASE_PREFIX)]
        while True:
            try:
                async for ev in domain.peers.watch_databases(pos, db_types, **scope):
                    pos = int(ev.id)
                    await queue.put(("d", pos, None if ev.type == STREAM_HEAD else ev))
                    head.set()
            except grpc.aio.AioRpcError as err:
                log.info("databases event stream unavailable (%s); retrying", err.code().name)
            head.set()  # go on without the databases position rather than stall accounts events
            await asyncio.sleep(1.0)

    if d_after is not None or not want_databases:
        head.set()
    tasks = [asyncio.create_task(accounts_events())]
    if want_databases:
        tasks.append(asyncio.create_task(databases_events()))
    a_pos, d_pos = a_after, d_after
    try:
        while True:
            kind, seq, ev = await queue.get()
            if kind == "x":
                raise ev
            if kind == "a":
                a_pos = seq
            else:
                d_pos = seq
            if ev is not None:
                ev.id = event_id(a_pos, d_pos)
                yield ev
    finally:
        for t in tasks:
            t.cancel()
