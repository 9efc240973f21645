"""What one RPC costs its service: PostgreSQL round trips and calls to other services.

The server chain (libs/interceptors.py, the Metrics stage) opens a `Tally` for every unary call;
the engine's cursor and transaction events and the channels of libs/clients.py add
to the tally of the call being served (a contextvar: tasks the handler spawns share it). When
the call ends the totals go to two histograms labelled by method, on the service's /metrics:

    ctrlmesh_rpc_sql_statements{service, method}   statements + BEGIN/COMMIT/ROLLBACK
    ctrlmesh_rpc_peer_calls{service, method}       RPCs made to other ctrlmesh services

so the budget tests (tests/e2e/test_request_budgets.py) read what real requests cost, like
Django's assertNumQueries, and a regression of one statement fails them. A BEGIN and its
COMMIT are round trips like any statement (asyncpg sends each on its own), so they count; a
read on an autocommit connection (`Database.read`) sends neither. Work outside an RPC
(reconcilers, streams) has no tally and is not counted.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

# Every integer up to 10, so a budget of n is a bucket of its own (le="n").
BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 50, 100, float("inf"))

SQL_STATEMENTS = Histogram(
    "ctrlmesh_rpc_sql_statements",
    "PostgreSQL round trips (statements, BEGIN, COMMIT, ROLLBACK) made while serving one RPC",
    ["service", "method"],
    buckets=BUCKETS,
)
PEER_CALLS = Histogram(
    "ctrlmesh_rpc_peer_calls",
    "RPCs to other ctrlmesh services made while serving one RPC",
    ["service", "method"],
    buckets=BUCKETS,
)


@dataclass
class Tally:
    sql: int = 0
    peer: int = 0


_current: contextvars.ContextVar[Tally | None] = contextvars.ContextVar("budget", default=None)


@contextmanager
def tally(service: str, method: str) -> Iterator[Tally]:
    """Count what the code inside costs, and observe it as one call of `service`/`method`."""
    t = Tally()
    token = _current.set(t)
    try:
        yield t
    finally:
        _current.reset(token)
        SQL_STATEMENTS.labels(service, method).observe(t.sql)
        PEER_CALLS.labels(service, method).observe(t.peer)


def current() -> Tally | None:
    return _current.get()


def _count_sql(*_: Any) -> None:
    t = _current.get()
    if t is not None:
        t.sql += 1


def _count_transaction(conn: Connection, *_: Any) -> None:
    # An autocommit connection sends no BEGIN or COMMIT (the DBAPI runs each statement alone).
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    _count_sql()


def instrument_engine(engine: AsyncEngine) -> None:
    """Count the engine's round trips into the tally of the RPC being served. SQLAlchemy runs
    these sync events inside the greenlet of the awaiting task, which shares its context."""
    sync = engine.sync_engine
    event.listen(sync, "before_cursor_execute", _count_sql)
    event.listen(sync, "begin", _count_transaction)
    event.listen(sync, "commit", _count_transaction)
    event.listen(sync, "rollback", _count_transaction)


def count_peer_call() -> None:
    """One call to another service (libs/clients.py's channels call it for each), added to the
    tally of the RPC being served."""
    t = _current.get()
    if t is not None:
        t.peer += 1
