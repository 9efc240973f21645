"""The one event-stream contract, and the merger behind /v2/events.

Every service that keeps an outbox serves it through `ctrlmesh.common.v1.EventStreamService`
(`register_event_stream`): resumable from a sequence number or from now (then led by a
`stream.head` event carrying the head's sequence), filtered by type and by account or tenant
visibility, for system principals only. Every event carries `account_id`, `tenant_id` and its
`source`.

`/v2/events` is `merge()` over the streams of every service in `EVENT_SOURCES`: a new service's
events appear by adding its name there and calling `register_event_stream` in its servicer, with
no change to accounts. The SSE id of a merged event is an opaque cursor holding the position in
every stream after that event, so Last-Event-ID resumes each stream exactly where it was. A
stream that is unavailable is retried every second from its last position; one that has no
position yet (a fresh watcher) is given `HEAD_WAIT` to report its head before events of the
others are sent without it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from ctrlmesh.common.v1 import internal_pb2, internal_pb2_grpc
from google.protobuf import struct_pb2, timestamp_pb2
from sqlalchemy import Table, and_
from sqlalchemy.sql.elements import ColumnElement

from libs import principal as principals
from libs.clients import Channels, Signer
from libs.errors import InvalidArgument, PermissionDenied
from libs.outbox import Outbox

log = logging.getLogger("ctrlmesh.events")

# The services whose outboxes /v2/events merges, in cursor order.
EVENT_SOURCES: tuple[str, ...] = ("accounts", "databases", "instances", "network", "clusters")

STREAM_HEAD = "stream.head"
HEAD_WAIT = 2.0
RETRY_AFTER = 1.0
_CURSOR_PREFIX = "c1."

Source = Callable[[int | None], AsyncIterator[internal_pb2.Event]]
"""A stream of one service from after a sequence number, or from now (None) led by its head."""


# -- one service's stream ------------------------------------------------------------------------


def outbox_filter(
    types: list[str], account_id: str = "", tenant_id: str = ""
) -> Callable[[Table], ColumnElement[bool] | None]:
    def where(t: Table) -> ColumnElement[bool] | None:
        conds: list[ColumnElement[bool]] = []
        if account_id:
            conds.append(t.c.account_id == account_id)
        if tenant_id:
            conds.append(t.c.tenant_id == tenant_id)
        if types:
            conds.append(t.c.type.in_(types))
        return and_(*conds) if conds else None

    return where


def event_from_row(row: Mapping[str, Any], source: str) -> internal_pb2.Event:
    data = struct_pb2.Struct()
    data.update(row["data"])
    time = timestamp_pb2.Timestamp()
    time.FromDatetime(row["created_at"])
    return internal_pb2.Event(
        id=str(row["seq"]),
        type=row["type"],
        account_id=row["account_id"],
        tenant_id=row["tenant_id"],
        resource=row["resource"],
        resource_id=row["resource_id"],
        data=data,
        time=time,
        source=source,
    )


async def outbox_stream(
    outbox: Outbox, source: str, after: int | None, where: Callable[[Table], ColumnElement[bool] | None]
) -> AsyncIterator[internal_pb2.Event]:
    """A service's own outbox as a stream (what StreamEvents serves, and what accounts merges
    locally without a network hop)."""
    if after is None:
        after = await outbox.last_seq()
        yield internal_pb2.Event(id=str(after), type=STREAM_HEAD, source=source)
    async for row in outbox.watch(after, where):
        yield event_from_row(row, source)


class EventStreamService(internal_pb2_grpc.EventStreamServiceServicer):
    def __init__(self, outbox: Outbox, source: str):
        self.outbox = outbox
        self.source = source

    async def StreamEvents(
        self, request: internal_pb2.StreamEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[internal_pb2.Event]:
        if principals.current().scope != "system":
            raise PermissionDenied("internal stream")
        where = outbox_filter(list(request.type), request.account_id, request.tenant_id)
        after = None if request.from_now else request.after
        async for event in outbox_stream(self.outbox, self.source, after, where):
            yield event


def register_event_stream(server: grpc.aio.Server, outbox: Outbox, source: str) -> str:
    """Serve a service's outbox as its EventStreamService; returns the full service name."""
    internal_pb2_grpc.add_EventStreamServiceServicer_to_server(EventStreamService(outbox, source), server)
    return str(internal_pb2.DESCRIPTOR.services_by_name["EventStreamService"].full_name)


def remote_source(
    channels: Channels,
    signer: Signer,
    service: str,
    *,
    types: list[str] | None = None,
    account_id: str = "",
    tenant_id: str = "",
) -> Source:
    """Another service's stream over gRPC, with this process's system principal."""

    async def stream(after: int | None) -> AsyncIterator[internal_pb2.Event]:
        stub = internal_pb2_grpc.EventStreamServiceStub(channels.get(service))
        req = internal_pb2.StreamEventsRequest(
            after=after or 0,
            from_now=after is None,
            type=types or [],
            account_id=account_id,
            tenant_id=tenant_id,
        )
        async for event in stub.StreamEvents(req, metadata=signer.system()):
            yield event

    return stream


# -- the merged cursor ---------------------------------------------------------------------------


def encode_cursor(positions: Mapping[str, int]) -> str:
    """The opaque id of a merged event: every known stream position, in EVENT_SOURCES order."""
    order = [s for s in EVENT_SOURCES if s in positions] + sorted(set(positions) - set(EVENT_SOURCES))
    text = ",".join(f"{s}:{positions[s]}" for s in order)
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(value: str) -> dict[str, int]:
    """The stream positions of a Last-Event-ID ({} when empty). The ids of earlier releases
    (`<accounts seq>` and `<accounts seq>.<databases seq>`) are still read."""
    if not value:
        return {}
    bad = InvalidArgument("last_event_id is not an event id", fields={"last_event_id": "not an event id"})
    if not value.startswith(_CURSOR_PREFIX):
        head, _, tail = value.partition(".")
        if not head.isdigit() or (tail and not tail.isdigit()):
            raise bad
        legacy = {"accounts": int(head)}
        if tail:
            legacy["databases"] = int(tail)
        return legacy
    raw = value[len(_CURSOR_PREFIX) :]
    try:
        text = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
        out: dict[str, int] = {}
        for part in text.split(",") if text else ():
            name, _, seq = part.partition(":")
            if not name or not seq.isdigit():
                raise ValueError(part)
            out[name] = int(seq)
        return out
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None


# -- the merger ----------------------------------------------------------------------------------


async def merge(
    sources: Mapping[str, Source], positions: Mapping[str, int], *, head_wait: float = HEAD_WAIT
) -> AsyncIterator[internal_pb2.Event]:
    """The events of every source as they come, each with the merged cursor after it as its id
    (see the module docstring). Runs until the consumer stops iterating."""
    pos: dict[str, int] = {s: p for s, p in positions.items() if s in sources}
    queue: asyncio.Queue[tuple[str, int, internal_pb2.Event]] = asyncio.Queue(maxsize=1000)
    heads = {s: asyncio.Event() for s in sources}

    async def follow(name: str, source: Source) -> None:
        after = pos.get(name)
        if after is not None:
            heads[name].set()
        while True:
            try:
                async for ev in source(after):
                    after = int(ev.id)
                    if ev.type == STREAM_HEAD:
                        # Known before any queued event is sent, so every cursor carries it.
                        pos.setdefault(name, after)
                        heads[name].set()
                        continue
                    await queue.put((name, after, ev))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
                log.info("the %s event stream is unavailable (%s); retrying", name, code)
            # Go on without this stream's head rather than stall the others.
            heads[name].set()
            await asyncio.sleep(RETRY_AFTER)

    tasks = [asyncio.create_task(follow(name, src)) for name, src in sources.items()]
    try:
        try:
            async with asyncio.timeout(head_wait):
                await asyncio.gather(*(h.wait() for h in heads.values()))
        except TimeoutError:
            pass
        while True:
            name, seq, ev = await queue.get()
            pos[name] = seq
            out = internal_pb2.Event()
            out.CopyFrom(ev)
            out.id = encode_cursor(pos)
            yield out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
