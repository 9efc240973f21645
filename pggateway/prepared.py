"""Named prepared statements that survive transaction pooling (PgBouncer's max_prepared_statements).

A client's named statements live in the gateway, not in a backend: `Parse("S", text, types)`
records S → a `ServerStatement` named after a hash of text and types (`cm_…`), so the same
statement from many clients is one statement on each backend. Whichever backend serves the next
transaction gets the statement when the client first uses it there (an injected Parse whose
ParseComplete the client never sees); each backend keeps at most `max_prepared` of them, the least
recently used Closed first.

The two directions are kept in step by a queue of expected responses. ParseComplete,
BindComplete and CloseComplete answer Parse, Bind and Close one to one and in order, and every
Sync/Query/FunctionCall gets exactly one ReadyForQuery, so recording only those three kinds (with
the number of the ReadyForQuery that ends their batch) is enough to know which ParseComplete is
ours to swallow; Execute and Describe responses need no bookkeeping. Where the client expects a
reply that the server will not send, the server is made to send it by a stand-in with no effect:
a Parse the backend already has becomes `Parse("", "")` (ParseComplete), a Close of a client
statement becomes a Close of a name that never exists (CloseComplete), `DEALLOCATE` becomes an
empty Query whose EmptyQueryResponse is rewritten into the CommandComplete. So replies stay in
the server's own order with nothing synthesized in between.

After an ErrorResponse in extended protocol the server skips everything up to Sync: every entry
of that batch still unanswered was skipped (or is the one that failed), and its bookkeeping is
undone newest first; messages sent later in the same batch are forwarded unchanged, untracked.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pggateway import classify, sqlprepare
from pggateway import protocol as pq

if TYPE_CHECKING:
    from pggateway.backend import Backend

PREFIX = b"cm_"
# Never created on a server (not a hex digest), so a Close of it is a harmless CloseComplete.
_NO_STATEMENT = PREFIX + b"none"
CLOSE_NOTHING = pq.message(pq.CLOSE, b"S" + _NO_STATEMENT + b"\x00")
# The unnamed statement, empty: a ParseComplete and nothing else for a statement already there.
PARSE_NOTHING = pq.message(pq.PARSE, b"\x00\x00\x00\x00")
EMPTY_QUERY = pq.query("")
SYNC = pq.message(pq.SYNC)

PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
EMPTY_QUERY_RESPONSE = ord("I")
COMMAND_COMPLETE = ord("C")

# What an entry of the response queue does with its reply, and what to undo if it never comes.
FORWARD = 0  # a client message passed through: nothing to undo
INJECTED = 1  # our Parse of a statement the backend lacked: swallow; undo = backend lacks it
CLIENT_NEW = 2  # the client's Parse, sent under the server name: undo both maps
CLIENT_HIT = 3  # the client's Parse of a statement the backend has (sent as PARSE_NOTHING)
CLIENT_CLOSE = 4  # the client's Close of its statement (sent as CLOSE_NOTHING): undo = restore
EVICTED = 5  # our Close of an evicted statement: swallow; undo = the backend still has it
UNNAMED = 6  # the client's Parse of its unnamed statement: undo = it has none

# SQLSTATE of "cached plan must not change result type": the statement must be prepared afresh.
_STALE_PLAN = "0A000"
_STALE_PLAN_TEXT = "cached plan must not change result type"


class ServerStatement:
    """One (query text, parameter types) as prepared on backends; shared by every client."""

    __slots__ = ("__weakref__", "name", "parse_message", "rest", "uses")

    def __init__(self, name: bytes, rest: bytes) -> None:
        self.name = name
        self.rest = rest  # the Parse body after the statement name: text, types
        self.parse_message = pq.message(pq.PARSE, name + b"\x00" + rest)
        # The statement an `EXECUTE cm_…` text runs: a backend must have it too.
        self.uses: ServerStatement | None = None


class BackendStatements:
    """The statements one backend holds, least recently used first, with the epoch (count of
    transactions ended) each was last used in: a statement used in the running transaction is
    never evicted, since closing it would close the portals made from it."""

    __slots__ = ("epoch", "lru")

    def __init__(self) -> None:
        self.lru: OrderedDict[bytes, list[object]] = OrderedDict()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lru)

    def touch(self, stmt: ServerStatement) -> bool:
        """Whether the backend has it (and mark it used now)."""
        slot = self.lru.get(stmt.name)
        if slot is None:
            return False
        slot[1] = self.epoch
        self.lru.move_to_end(stmt.name)
        return True

    def add(self, stmt: ServerStatement, limit: int) -> list[ServerStatement]:
        """Record a statement being prepared; the ones to Close to stay within `limit`."""
        self.lru[stmt.name] = [stmt, self.epoch]
        evicted: list[ServerStatement] = []
        if len(self.lru) > limit:
            for name, (old, used) in list(self.lru.items()):
                if len(self.lru) <= limit:
                    break
                if used != self.epoch:
                    del self.lru[name]
                    assert isinstance(old, ServerStatement)
                    evicted.append(old)
        return evicted

    def add_unbounded(self, stmt: ServerStatement) -> None:
        """Record a statement being prepared where nothing can be Closed first (a transaction
        believed failed); the next `add` brings the set back within its limit."""
        self.lru[stmt.name] = [stmt, self.epoch]

    def discard(self, stmt: ServerStatement) -> None:
        self.lru.pop(stmt.name, None)

    def restore(self, stmt: ServerStatement) -> None:
        """Put back a statement whose Close was skipped, as the least recently used."""
        self.lru[stmt.name] = [stmt, -1]
        self.lru.move_to_end(stmt.name, last=False)

    def clear(self) -> None:
        self.lru.clear()


class StatementRegistry(Collector):
    """The gateway's statements: interned by text and types, each backend's set, the counters.

    Exported at scrape time from plain numbers, like HotPathMetrics, since the counters move on
    the relay path."""

    def __init__(self, max_prepared: int) -> None:
        self.max_prepared = max_prepared
        self._interned: weakref.WeakValueDictionary[bytes, ServerStatement] = weakref.WeakValueDictionary()
        self._backends: weakref.WeakKeyDictionary[Backend, BackendStatements] = weakref.WeakKeyDictionary()
        self._generation = 0
        self.injected = 0
        self.evictions = 0
        self.shared_hits = 0
        self.invalidations = 0

    @property
    def enabled(self) -> bool:
        return self.max_prepared > 0

    def statement(self, rest: bytes) -> ServerStatement:
        stmt = self._interned.get(rest)
        if stmt is None:
            digest = hashlib.blake2b(rest, digest_size=12).hexdigest().encode()
            name = PREFIX + digest
            if self._generation:
                name += b"_%d" % self._generation
            stmt = ServerStatement(name, rest)
            self._interned[rest] = stmt
        return stmt

    def invalidate(self, stmt: ServerStatement) -> None:
        """A schema change broke this statement's plan: new Parses get a fresh server name."""
        if self._interned.get(stmt.rest) is stmt:
            del self._interned[stmt.rest]
            self._generation += 1
            self.invalidations += 1

    def of(self, b: Backend) -> BackendStatements:
        st = self._backends.get(b)
        if st is None:
            st = self._backends[b] = BackendStatements()
        return st

    def forget(self, b: Backend) -> None:
        """The backend's statements are gone (DISCARD ALL)."""
        st = self._backends.get(b)
        if st is not None:
            st.clear()

    def collect(self) -> Iterator[Metric]:
        live: list[int] = []
        for _ in range(5):
            # Scraped from the metrics server's thread while the event loop adds backends.
            try:
                live = [len(st) for b, st in list(self._backends.items()) if not b.closed]
                break
            except RuntimeError:
                continue
        yield GaugeMetricFamily(
            "pggateway_prepared_statements",
            "Prepared statements held by open backends (all backends together).",
            value=sum(live),
        )
        yield GaugeMetricFamily(
            "pggateway_prepared_statements_max_per_backend",
            "The most prepared statements one open backend holds.",
            value=max(live, default=0),
        )
        yield CounterMetricFamily(
            "pggateway_prepared_injected_parses",
            "Parses the gateway sent so a backend has a client's statement.",
            value=self.injected,
        )
        yield CounterMetricFamily(
            "pggateway_prepared_evictions",
            "Statements Closed on a backend to keep it within max_prepared_statements.",
            value=self.evictions,
        )
        yield CounterMetricFamily(
            "pggateway_prepared_shared_hits",
            "Client Parses answered by a statement the backend already had.",
            value=self.shared_hits,
        )
        yield CounterMetricFamily(
            "pggateway_prepared_invalidations",
            "Statements re-named after 'cached plan must not change result type'.",
            value=self.invalidations,
        )


class _Entry:
    __slots__ = ("action", "batch", "name", "seq", "stmt")

    def __init__(
        self, seq: int, batch: int, action: int, stmt: ServerStatement | None = None, name: bytes = b""
    ) -> None:
        self.seq = seq
        self.batch = batch
        self.action = action
        self.stmt = stmt
        self.name = name


def _query_message(sql: bytes) -> bytes:
    return pq.message(pq.QUERY, sql + b"\x00")


def _cstr_end(data: bytes, pos: int) -> int:
    end = data.find(b"\x00", pos)
    if end < 0:
        raise pq.ProtocolError("unterminated string")
    return end


def deallocate_target(sql: bytes | bytearray | memoryview) -> bytes | None:
    """For `DEALLOCATE [PREPARE] name|ALL` alone: the name (b"" for ALL); else None."""
    stmt = sqlprepare.read(sql)
    return stmt.name if isinstance(stmt, sqlprepare.Deallocate) else None


def mentions_statements(query: bytes | bytearray | memoryview) -> bool:
    """Whether a Query's text may PREPARE, EXECUTE, DEALLOCATE or DISCARD (the relay then looks
    closer)."""
    low = bytes(query).lower()
    return b"prepare" in low or b"execute" in low or b"deallocate" in low or b"discard" in low


def _mentions_reset(low: bytes) -> bool:
    return b"deallocate" in low or b"discard" in low


def _prepares(sql: str) -> bool:
    """Whether a text has a PREPARE (not PREPARE TRANSACTION) among its statements."""
    return any(w[:1] == ["prepare"] and w[1:2] != ["transaction"] for w in classify.split_statements(sql))


def is_discard_all(sql: str) -> bool:
    words = sql.strip().rstrip(";").split()
    return len(words) == 2 and words[0].lower() == "discard" and words[1].lower() == "all"


class PreparedRelay:
    """One client's statements, and the response queue of the backend serving it now.

    `client_chunk` rewrites what the client sends; `feed` follows (and edits) what the backend
    sends back, and also does ServerStreamScanner's job with the same interface (the count of
    ReadyForQuery returned, the last one's status in `status`, ParameterStatus and ErrorResponse
    bodies appended to `others` for the caller to empty), so a session uses it in place of the
    scanner."""

    def __init__(self, registry: StatementRegistry) -> None:
        self.registry = registry
        self.statements: dict[bytes, ServerStatement] = {}
        self._backend: Backend | None = None
        self._held: BackendStatements = BackendStatements()
        self._parses: deque[_Entry] = deque()
        self._binds: deque[_Entry] = deque()
        self._closes: deque[_Entry] = deque()
        # Batches: the number of ReadyForQuery-producing messages (Sync, Query, FunctionCall)
        # sent before a message is its batch; `_seen` counts the ReadyForQuery received.
        self._sent = 0
        self._seen = 0
        self._seq = 0
        self._failed_batch = -1
        # batch → the CommandComplete tag that replaces its EmptyQueryResponse (DEALLOCATE).
        self._empty_tags: dict[int, bytes] = {}
        # Batches whose Query may drop the backend's statements and settings (DISCARD ALL, or
        # another mention of DISCARD/DEALLOCATE): forgotten if it succeeds; True when the
        # client's own statements go too.
        self._discards: dict[int, bool] = {}
        # The client's unnamed statement (its Parse body) and the attach it was parsed in: a
        # client may Parse it, Sync, and Bind it in its next batch (asyncpg without a statement
        # cache), which transaction pooling may send to another backend.
        self._unnamed: bytes | None = None
        self._unnamed_at = -1
        self._attached = 0
        # The statement the unnamed one EXECUTEs (its text names it by our name), if any.
        self._unnamed_uses: ServerStatement | None = None
        # SQL PREPARE/EXECUTE (sqlprepare): the client's PREPAREs sent on (undone if their Query
        # fails), batches whose ReadyForQuery is ours (a Sync after injected Parses) and
        # batches whose errors name a statement by our name (server name → the client's).
        self._queries: deque[_Entry] = deque()
        self._swallow: set[int] = set()
        self._renames: dict[int, tuple[bytes, bytes]] = {}
        # A PREPARE reached the backend untracked (several statements, or text the lexer
        # refused: the session is pinned): DEALLOCATE ALL must then reach the backend too.
        self._untracked = False
        # Statements whose text was `DEALLOCATE` of the client's statements, sent as the empty
        # statement (client name, b"" unnamed → the name deallocated, b"" for ALL): their
        # execution is answered by the EmptyQueryResponse, turned into the tag.
        self._deallocs: dict[bytes, bytes] = {}
        # Named statements whose text is `EXECUTE q(…)` / `DEALLOCATE q`: (text, where q is in
        # it, q, the Parse body after the text). Each Bind resolves q again, as PostgreSQL does
        # when it runs them: q may have been deallocated or prepared anew since.
        self._refs: dict[bytes, tuple[bytes, int, int, bytes, bytes]] = {}
        # Scanner state and results (as ServerStreamScanner).
        self._head = b""
        self._kind = 0
        self._remaining = 0
        self._body: bytearray | None = None
        self.status = b"I"
        self.others: list[tuple[int, bytes]] = []

    # -- attach / idle ---------------------------------------------------------------------------
    def attach(self, b: Backend) -> None:
        self._attached += 1
        self._backend = b
        self._held = self.registry.of(b)
        self._held.epoch += 1
        self._parses.clear()
        self._binds.clear()
        self._closes.clear()
        self._queries.clear()
        self._swallow.clear()
        self._renames.clear()
        self._sent = self._seen = 0
        self._failed_batch = -1
        self._empty_tags.clear()
        self._discards.clear()
        self.others.clear()
        self.reset()

    def reset(self) -> None:
        self._head, self._kind, self._remaining, self._body = b"", 0, 0, None

    @property
    def at_boundary(self) -> bool:
        return not self._head and self._remaining == 0

    def count_batches(self, n: int) -> None:
        """A chunk forwarded unchanged carried `n` Sync/Query/FunctionCall messages."""
        self._sent += n

    def deallocate_idle(self, sql: bytes | bytearray | memoryview) -> bytes | None:
        """With no backend and nothing outstanding: the reply to a DEALLOCATE of the client's own
        statements, answered here (psycopg sends DEALLOCATE ALL after every ROLLBACK); None when
        it has to reach a backend."""
        target = deallocate_target(sql)
        if target is None:
            return None
        if target:
            if self.statements.pop(target, None) is None:
                return None
            tag = b"DEALLOCATE"
        else:
            if self._untracked:
                return None
            self.statements.clear()
            tag = b"DEALLOCATE ALL"
        return pq.message(COMMAND_COMPLETE, tag + b"\x00") + pq.ready_for_query(b"I")

    # -- client → backend ------------------------------------------------------------------------
    def _entry(self, queue: deque[_Entry], action: int, stmt: ServerStatement | None, name: bytes) -> None:
        self._seq += 1
        queue.append(_Entry(self._seq, self._sent, action, stmt, name))

    def _ensure(self, stmt: ServerStatement, out: list[bytes]) -> None:
        """Make the backend have `stmt` before the message that uses it."""
        if stmt.uses is not None:
            self._ensure(stmt.uses, out)
        if self._held.touch(stmt):
            return
        self._prepare(stmt, out)
        out.append(stmt.parse_message)
        self._entry(self._parses, INJECTED, stmt, b"")
        self.registry.injected += 1

    def _prepare(self, stmt: ServerStatement, out: list[bytes]) -> None:
        """Record `stmt` as on the backend, Closing what that evicts (before the Parse)."""
        for old in self._held.add(stmt, self.registry.max_prepared):
            out.append(pq.message(pq.CLOSE, b"S" + old.name + b"\x00"))
            self._entry(self._closes, EVICTED, old, b"")
            self.registry.evictions += 1

    def client_chunk(
        self, data: bytes, tx_status: bytes, msgs: list[tuple[int, int, int]] | None = None
    ) -> bytes:
        """The bytes to send the backend for a chunk of whole client messages (`msgs`: its
        framing, when the caller has it)."""
        if msgs is None:
            msgs, _ = pq.iter_messages(data)
        out: list[bytes] = []
        run = 0  # start of the current run of unchanged bytes
        for kind, start, end in msgs:
            if kind == pq.SYNC or kind == pq.FUNCTION_CALL:
                self._sent += 1
                continue
            replace: list[bytes] | None = None
            failed = self._failed_batch == self._sent
            if kind == pq.QUERY:
                replace = self._query(data, start, end, tx_status)
                self._sent += 1
            elif failed:
                continue  # skipped by the server until Sync: no reply, no bookkeeping
            elif kind == pq.PARSE:
                replace = self._parse(data, start, end)
            elif kind == pq.BIND:
                replace = self._bind(data, start, end)
            elif kind == pq.DESCRIBE or kind == pq.CLOSE:
                replace = self._describe_or_close(kind, data, start, end)
            if replace is not None:
                if run < start:
                    out.append(data[run:start])
                out += replace
                run = end
        if not out:
            return data
        if run < len(data):
            out.append(data[run:])
        return b"".join(out)

    def _query(self, data: bytes, start: int, end: int, tx_status: bytes) -> list[bytes] | None:
        payload = data[start + 5 : end]
        if not mentions_statements(payload):
            return None
        if self._queries or self._renames:
            self._prune()
        low = bytes(payload).lower()
        stmt = sqlprepare.read(payload)
        if stmt is None:
            sql = pq.parse_query(payload)
            if _mentions_reset(low):
                if is_discard_all(sql):
                    self._discards[self._sent] = True
                    return None
                # Several statements, a DO block, a literal: the backend may lose statements.
                self._discards.setdefault(self._sent, False)
            if b"prepare" in low and _prepares(sql):
                self._untracked = True
            return None
        if isinstance(stmt, sqlprepare.Prepare):
            return self._sql_prepare(stmt, tx_status)
        if isinstance(stmt, sqlprepare.Execute):
            return self._sql_execute(stmt, payload, tx_status)
        if tx_status == b"E":
            return None  # the server's own answer (25P02 in a failed transaction)
        target = stmt.name
        if target:
            if self.statements.pop(target, None) is None:
                return None  # not one of ours: the server's own 26000 (or an untracked one)
            self._empty_tags[self._sent] = b"DEALLOCATE"
        elif self._untracked:
            # The backend has statements of this client we do not know: it must drop them (and
            # so all of ours on it).
            self._discards[self._sent] = True
            return None
        else:
            self.statements.clear()
            self._empty_tags[self._sent] = b"DEALLOCATE ALL"
        return [EMPTY_QUERY]

    def _prune(self) -> None:
        """Forget the bookkeeping of batches already answered."""
        seen = self._seen
        while self._queries and self._queries[0].batch < seen:
            self._queries.popleft()
        for batch in [b for b in self._renames if b < seen]:
            del self._renames[batch]

    def _before_query(self, out: list[bytes]) -> None:
        """End the injected extended-protocol messages in `out` with a Sync whose ReadyForQuery
        is ours: a simple Query right after an unsynced Parse would be skipped by the server if
        the Parse failed."""
        if out:
            out.append(SYNC)
            self._swallow.add(self._sent)
            self._sent += 1

    def _sql_prepare(self, p: sqlprepare.Prepare, tx_status: bytes) -> list[bytes]:
        """The client's PREPARE, sent under the server's name (or answered by an empty query when
        the backend has the statement); the server's errors are its own."""
        failed = tx_status == b"E"
        old = self.statements.get(p.name)
        out: list[bytes] = []
        if old is not None:
            # PostgreSQL's 42P05, made by the server on a name it has (and renamed back); the
            # statement is still analysed first, as directly.
            if not failed:
                self._ensure(old, out)
                self._before_query(out)
            self._renames[self._sent] = (old.name, p.name)
            out.append(
                _query_message(b"PREPARE " + old.name + b" " + p.type_sql.encode() + b"AS " + p.statement)
            )
            return out
        stmt = self.registry.statement(p.parse_rest())
        self.statements[p.name] = stmt
        if self._held.touch(stmt):
            self.registry.shared_hits += 1
            if not failed:
                self._empty_tags[self._sent] = b"PREPARE"
                return [EMPTY_QUERY]
            self._entry(self._queries, CLIENT_HIT, stmt, p.name)
        elif failed:
            self._held.add_unbounded(stmt)
            self._entry(self._queries, CLIENT_NEW, stmt, p.name)
        else:
            self._prepare(stmt, out)
            self._before_query(out)
            self._entry(self._queries, CLIENT_NEW, stmt, p.name)
        self._renames[self._sent] = (stmt.name, p.name)
        out.append(
            _query_message(b"PREPARE " + stmt.name + b" " + p.type_sql.encode() + b"AS " + p.statement)
        )
        return out

    def _sql_execute(self, e: sqlprepare.Execute, payload: bytes, tx_status: bytes) -> list[bytes] | None:
        """EXECUTE of one of the client's statements, under the server's name, on a backend made
        to have it."""
        stmt = self.statements.get(e.name)
        if stmt is None:
            return None  # the server's own 26000
        out: list[bytes] = []
        if tx_status != b"E":
            self._ensure(stmt, out)
            self._before_query(out)
        text = bytes(payload)
        nul = text.find(b"\x00")
        if nul >= 0:
            text = text[:nul]
        self._renames[self._sent] = (stmt.name, e.name)
        out.append(_query_message(text[: e.name_start] + stmt.name + text[e.name_end :]))
        return out

    def _parse(self, data: bytes, start: int, end: int) -> list[bytes] | None:
        name_end = _cstr_end(data, start + 5)
        name = data[start + 5 : name_end]
        rest = data[name_end + 1 : end]
        uses: ServerStatement | None = None
        dealloc: bytes | None = None
        ref: tuple[bytes, int, int, bytes, bytes] | None = None
        text_end = _cstr_end(data, name_end + 1)
        if text_end - name_end > 7:
            low = bytes(data[name_end + 1 : text_end]).lower()
            if b"prepare" in low and _prepares(low.decode("latin-1")):
                self._untracked = True  # pinned by the session (classify)
            if b"execute" in low:
                # `EXECUTE q(…)` of one of the client's statements (psycopg prepares it once run
                # often enough): the text names ours, which every backend running it gets first.
                e = sqlprepare.read(data[name_end + 1 : text_end])
                if isinstance(e, sqlprepare.Execute) and (uses := self.statements.get(e.name)) is not None:
                    text = bytes(data[name_end + 1 : text_end])
                    rest = text[: e.name_start] + uses.name + text[e.name_end :] + data[text_end:end]
                    self._renames[self._sent] = (uses.name, e.name)
                    if name:
                        ref = (text, e.name_start, e.name_end, e.name, bytes(data[text_end:end]))
            elif b"deallocate" in low:
                d = sqlprepare.read(data[name_end + 1 : text_end])
                if isinstance(d, sqlprepare.Deallocate) and (
                    d.name in self.statements if d.name else not self._untracked
                ):
                    # psycopg prepares `DEALLOCATE q` too: the server gets the empty statement
                    # (with the client's parameter types), the gateway forgets q when it runs.
                    rest = b"\x00" + data[text_end + 1 : end]
                    dealloc = d.name
                    if name and d.name:
                        text = bytes(data[name_end + 1 : text_end])
                        ref = (text, 0, 0, d.name, bytes(data[text_end:end]))
        if dealloc is not None:
            self._deallocs[name] = dealloc
        elif self._deallocs:
            self._deallocs.pop(name, None)
        if ref is not None:
            self._refs[name] = ref
        elif self._refs:
            self._refs.pop(name, None)
        out: list[bytes] = []
        if uses is not None:
            self._ensure(uses, out)
        if not name:
            self._unnamed = rest
            self._unnamed_at = self._attached
            self._unnamed_uses = uses
            self._entry(self._parses, UNNAMED, None, b"")
            if uses is None and dealloc is None:
                return None
            out.append(pq.message(pq.PARSE, b"\x00" + rest))
            return out
        old = self.statements.get(name)
        if old is not None:
            # PostgreSQL's 42P05 "already exists", made by the server on its own name.
            self._ensure(old, out)
            out.append(old.parse_message)
            self._entry(self._parses, FORWARD, None, b"")
            return out
        stmt = self.registry.statement(rest)
        if uses is not None:
            stmt.uses = uses
        self.statements[name] = stmt
        if self._held.touch(stmt):
            self.registry.shared_hits += 1
            self._entry(self._parses, CLIENT_HIT, stmt, name)
            self._unnamed_at = -1  # PARSE_NOTHING replaced the unnamed statement
            out.append(PARSE_NOTHING)
            return out
        self._prepare(stmt, out)
        out.append(stmt.parse_message)
        self._entry(self._parses, CLIENT_NEW, stmt, name)
        return out

    def _unnamed_again(self) -> list[bytes]:
        """The client's unnamed statement parsed again on this backend (ParseComplete swallowed)."""
        assert self._unnamed is not None
        out: list[bytes] = []
        if self._unnamed_uses is not None:
            self._ensure(self._unnamed_uses, out)
        self._unnamed_at = self._attached
        self._entry(self._parses, INJECTED, None, b"")
        out.append(pq.message(pq.PARSE, b"\x00" + self._unnamed))
        return out

    def _bind(self, data: bytes, start: int, end: int) -> list[bytes] | None:
        portal_end = _cstr_end(data, start + 5)
        name_end = _cstr_end(data, portal_end + 1)
        name = data[portal_end + 1 : name_end]
        stmt = self.statements.get(name) if name else None
        if self._refs and name in self._refs:
            stmt = self._resolve(name)
        elif self._deallocs and (target := self._deallocs.get(name)) is not None:
            self._run_deallocate(target)
        if not name and self._unnamed is not None and self._unnamed_at != self._attached:
            again = self._unnamed_again()
            self._entry(self._binds, FORWARD, None, b"")
            return [*again, data[start:end]]
        self._entry(self._binds, FORWARD, stmt, b"")
        if stmt is None:
            return None  # unnamed, or unknown: the server answers as it would directly
        if stmt.uses is not None:
            # Its `EXECUTE cm_…` may fail naming ours: the client's name for it, in the error.
            for client_name, s in self.statements.items():
                if s is stmt.uses:
                    self._renames[self._sent] = (s.name, client_name)
                    break
        out: list[bytes] = []
        self._ensure(stmt, out)
        body = data[start + 5 : portal_end + 1] + stmt.name + data[name_end:end]
        out.append(pq.message(pq.BIND, body))
        return out

    def _resolve(self, name: bytes) -> ServerStatement:
        """The server statement a Bind of `EXECUTE q(…)` / `DEALLOCATE q` runs now: with our name
        for the client's current q, or (q gone) the client's own text, so the server answers
        26000 naming q as it would directly."""
        text, start, end, target_name, tail = self._refs[name]
        target = self.statements.get(target_name)
        if self._deallocs.get(name) is not None:
            if target is not None:
                self._run_deallocate(target_name)
                rest = b"\x00" + tail[1:]
            else:
                rest = text + tail
            stmt = self.registry.statement(rest)
        elif target is not None:
            stmt = self.registry.statement(text[:start] + target.name + text[end:] + tail)
            stmt.uses = target
            self._renames[self._sent] = (target.name, target_name)
        else:
            stmt = self.registry.statement(text + tail)
        self.statements[name] = stmt
        return stmt

    def _run_deallocate(self, target: bytes) -> None:
        """A Bind of a statement standing for `DEALLOCATE target` (its Execute follows)."""
        if target:
            self.statements.pop(target, None)
            self._empty_tags[self._sent] = b"DEALLOCATE"
        else:
            self.statements.clear()
            self._empty_tags[self._sent] = b"DEALLOCATE ALL"

    def _describe_or_close(self, kind: int, data: bytes, start: int, end: int) -> list[bytes] | None:
        what = data[start + 5 : start + 6]
        name = data[start + 6 : end - 1]
        stmt = self.statements.get(name) if what == b"S" and name else None
        if kind == pq.DESCRIBE:
            if what == b"S" and not name and self._unnamed is not None and self._unnamed_at != self._attached:
                return [*self._unnamed_again(), data[start:end]]
            if stmt is None:
                return None
            out: list[bytes] = []
            self._ensure(stmt, out)
            out.append(pq.message(pq.DESCRIBE, b"S" + stmt.name + b"\x00"))
            return out
        if stmt is None:
            self._entry(self._closes, FORWARD, None, b"")
            return None
        del self.statements[name]
        self._entry(self._closes, CLIENT_CLOSE, stmt, name)
        return [CLOSE_NOTHING]

    # -- backend → client ------------------------------------------------------------------------
    def feed(self, data: bytes) -> tuple[bytes, int]:
        """(the bytes for the client, the number of ReadyForQuery messages completed)."""
        ready = 0
        if self._head:
            # Held back, not forwarded: a header split across reads.
            data = self._head + data
            self._head = b""
        pos, n = 0, len(data)
        cuts: list[tuple[int, int, bytes]] | None = None
        if self._remaining:
            take = min(self._remaining, n)
            if self._body is not None:
                self._body += data[:take]
            self._remaining -= take
            pos = take
            if self._remaining == 0 and self._body is not None:
                body = bytes(self._body)
                self._body = None
                ready += self._complete(self._kind, body)
        unpack = pq._HEADER.unpack_from
        interesting = _INTERESTING
        while pos < n:
            if pos + 5 > n:
                self._head = bytes(data[pos:])
                n = pos
                break
            kind, length = unpack(data, pos)
            if length < 4:
                raise pq.ProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if kind not in interesting:
                if end > n:
                    self._kind = kind
                    self._remaining = end - n
                    self._body = None
                    break
                pos = end
                continue
            if kind == READY_FOR_QUERY and end <= n and not self._discards and not self._swallow:
                # The common case inline: one per transaction.
                self._seen += 1
                if data[pos + 5] == _IDLE:
                    self._held.epoch += 1
                ready += 1
                self.status = data[pos + 5 : pos + 6]
                pos = end
                continue
            if kind in _SMALL:
                if kind == PARSE_COMPLETE:
                    q = self._parses
                elif kind == CLOSE_COMPLETE:
                    q = self._closes
                elif kind == BIND_COMPLETE:
                    q = self._binds
                else:
                    tag = self._empty_tags.pop(self._seen, None) if self._empty_tags else None
                    if tag is not None:
                        if cuts is None:
                            cuts = []
                        cuts.append((pos, end, pq.message(COMMAND_COMPLETE, tag + b"\x00")))
                    pos = end
                    continue
                if q:
                    e = q.popleft()
                    if e.action == INJECTED or e.action == EVICTED:
                        if cuts is None:
                            cuts = []
                        cuts.append((pos, end, b""))
                pos = end
                continue
            if (self._swallow and kind == READY_FOR_QUERY and self._seen in self._swallow) or (
                self._renames and kind == pq.ERROR_RESPONSE and self._seen in self._renames
            ):
                # Ours to drop or to edit: held back until whole.
                if end > n:
                    self._head = bytes(data[pos:n])
                    n = pos
                    break
                if cuts is None:
                    cuts = []
                if kind == READY_FOR_QUERY:
                    self._swallow.discard(self._seen)
                    self._seen += 1
                    cuts.append((pos, end, b""))
                else:
                    server, client = self._renames[self._seen]
                    body = bytes(data[pos + 5 : end]).replace(b'"' + server + b'"', b'"' + client + b'"')
                    cuts.append((pos, end, pq.message(pq.ERROR_RESPONSE, body)))
                    self._complete(kind, body)
                pos = end
                continue
            if end <= n:
                ready += self._complete(kind, bytes(data[pos + 5 : end]))
                pos = end
                continue
            self._kind = kind
            self._remaining = end - n
            self._body = bytearray(data[pos + 5 : n])
            break
        if cuts is None:
            return (data if n == len(data) else data[:n]), ready
        out: list[bytes] = []
        at = 0
        for cut_start, cut_end, repl in cuts:
            out.append(data[at:cut_start])
            if repl:
                out.append(repl)
            at = cut_end
        out.append(data[at:n])
        return b"".join(out), ready

    def _complete(self, kind: int, body: bytes) -> int:
        """A whole wanted message; 1 for a ReadyForQuery."""
        if kind == pq.READY_FOR_QUERY:
            batch = self._seen
            self._seen += 1
            if batch in self._discards:
                own = self._discards.pop(batch)
                if self._failed_batch != batch and self._backend is not None:
                    # The server dropped every statement and setting of this backend.
                    self._held.clear()
                    self._backend.applied = {}
                    if own:
                        self.statements.clear()
            if body[:1] == b"I":
                self._held.epoch += 1
            self.status = body[:1]
            return 1
        if kind == pq.ERROR_RESPONSE:
            self._failed(body)
        # The session's too: ParameterStatus for the backend's settings, a FATAL error for
        # a backend about to close.
        self.others.append((kind, body))
        return 0

    def _failed(self, body: bytes) -> None:
        """An ErrorResponse: undo whatever of this batch the server skipped or refused."""
        batch = self._seen
        self._failed_batch = batch
        self._empty_tags.pop(batch, None)
        lost: list[_Entry] = []
        for q in (self._parses, self._binds, self._closes):
            while q and q[0].batch <= batch:
                lost.append(q.popleft())
        queries = self._queries
        while queries and queries[0].batch <= batch:
            e = queries.popleft()
            if e.batch == batch:
                lost.append(e)
        if not lost:
            return
        lost.sort(key=lambda e: e.seq, reverse=True)
        fields = pq.parse_fields(body)
        if fields.get("C") == _STALE_PLAN and _STALE_PLAN_TEXT in fields.get("M", ""):
            # The failing message is the first unanswered one, a Bind of a statement the schema
            # change broke.
            first = lost[-1]
            if first.stmt is not None and first.action == FORWARD:
                self.registry.invalidate(first.stmt)
        for e in lost:
            stmt = e.stmt
            if e.action == UNNAMED:
                self._unnamed = None
                self._unnamed_uses = None
            if stmt is None:
                continue
            if e.action == INJECTED:
                self._held.discard(stmt)
            elif e.action == CLIENT_NEW:
                self._held.discard(stmt)
                if self.statements.get(e.name) is stmt:
                    del self.statements[e.name]
            elif e.action == CLIENT_HIT:
                if self.statements.get(e.name) is stmt:
                    del self.statements[e.name]
            elif e.action == CLIENT_CLOSE:
                self.statements.setdefault(e.name, stmt)
            elif e.action == EVICTED:
                self._held.restore(stmt)


_SMALL = frozenset((PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, EMPTY_QUERY_RESPONSE))
_WANTED = frozenset((pq.READY_FOR_QUERY, pq.PARAMETER_STATUS, pq.ERROR_RESPONSE))
_INTERESTING = _SMALL | _WANTED
READY_FOR_QUERY = pq.READY_FOR_QUERY
_IDLE = ord("I")
