"""The gateway-side prepared statements (pggateway/prepared.py) on recorded message sequences:
what reaches the backend for what a client sends, and what reaches the client for what the
backend answers, without sockets."""

from __future__ import annotations

import struct
from typing import cast

import pytest

from pggateway import protocol as pq
from pggateway import sqlprepare
from pggateway.backend import Backend
from pggateway.prepared import CLOSE_NOTHING, EMPTY_QUERY, PARSE_NOTHING, PreparedRelay, StatementRegistry


class FakeBackend:
    """What the relay reads of a backend: its closed flag and the settings applied to it."""

    def __init__(self) -> None:
        self.closed = False
        self.applied: dict[str, str] = {"application_name": "x"}


def backend() -> Backend:
    return cast(Backend, FakeBackend())


def parse(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\x00" + sql + b"\x00" + struct.pack("!h", len(types))
    return pq.message(pq.PARSE, body + b"".join(struct.pack("!I", t) for t in types))


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return pq.message(pq.BIND, portal + b"\x00" + stmt + b"\x00" + b"\x00\x00\x00\x00\x00\x00")


def describe(stmt: bytes) -> bytes:
    return pq.message(pq.DESCRIBE, b"S" + stmt + b"\x00")


def close(stmt: bytes) -> bytes:
    return pq.message(pq.CLOSE, b"S" + stmt + b"\x00")


EXECUTE = pq.message(pq.EXECUTE, b"\x00\x00\x00\x00\x00")
SYNC = pq.message(pq.SYNC)
PARSE_COMPLETE = pq.message(ord("1"))
BIND_COMPLETE = pq.message(ord("2"))
CLOSE_COMPLETE = pq.message(ord("3"))
DATA_ROW = pq.message(ord("D"), b"\x00\x01\x00\x00\x00\x011")
SELECT_1 = pq.message(ord("C"), b"SELECT 1\x00")
READY = pq.ready_for_query(b"I")
ERROR = pq.error_response("ERROR", "22012", "division by zero")


def kinds(stream: bytes) -> str:
    return "".join(chr(k) for k, _, _ in pq.iter_messages(stream)[0])


def names(stream: bytes) -> list[bytes]:
    """The statement names of the Parse/Bind/Describe/Close messages in a stream."""
    out = []
    for kind, start, end in pq.iter_messages(stream)[0]:
        body = stream[start + 5 : end]
        if kind == pq.PARSE:
            out.append(body.split(b"\x00")[0])
        elif kind == pq.BIND:
            out.append(body.split(b"\x00")[1])
        elif kind in (pq.DESCRIBE, pq.CLOSE):
            out.append(body[1:-1])
    return out


def feed(relay: PreparedRelay, *chunks: bytes) -> tuple[bytes, list[int]]:
    """What the client gets, and the kinds of the messages the session is told of (each chunk's
    ReadyForQuery first)."""
    out, events = b"", []
    for chunk in chunks:
        data, ready = relay.feed(chunk)
        out += data
        events += [pq.READY_FOR_QUERY] * ready + [k for k, _ in relay.others]
        relay.others.clear()
    return out, events


def test_a_statement_moves_to_another_backend_and_the_injected_parse_is_invisible() -> None:
    """Parse goes out under the shared server name; on a backend without it, a Bind is preceded
    by an injected Parse whose ParseComplete the client never sees, split reads included."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b1, b2 = backend(), backend()
    relay.attach(b1)
    sent = relay.client_chunk(parse(b"s1", b"select 1") + bind(b"s1") + EXECUTE + SYNC, b"I")
    server = next(iter(names(sent)))
    assert server.startswith(b"cm_") and names(sent) == [server, server]
    reply = PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY
    assert feed(relay, reply)[0] == reply

    relay.attach(b2)
    sent = relay.client_chunk(bind(b"s1") + EXECUTE + SYNC, b"I")
    assert kinds(sent) == "PBES" and names(sent) == [server, server]
    assert reg.injected == 1
    # The server's reply arrives in odd pieces: ParseComplete split in its header.
    out, events = feed(relay, reply[:3], reply[3:7], reply[7:])
    assert out == BIND_COMPLETE + DATA_ROW + SELECT_1 + READY
    assert events == [pq.READY_FOR_QUERY]
    assert relay.at_boundary
    # Back on b1 it is still there: no Parse.
    relay.attach(b1)
    assert kinds(relay.client_chunk(bind(b"s1") + EXECUTE + SYNC, b"I")) == "BES"


def test_a_second_client_shares_the_statement_and_gets_its_own_parse_complete() -> None:
    """Identical text and types from another client is the same server statement: its Parse
    becomes PARSE_NOTHING (so the server still answers ParseComplete, in order); different types
    are a different statement."""
    reg = StatementRegistry(10)
    a, c = PreparedRelay(reg), PreparedRelay(reg)
    b = backend()
    a.attach(b)
    first = a.client_chunk(parse(b"__asyncpg_stmt_1__", b"select $1", (23,)) + SYNC, b"I")
    feed(a, PARSE_COMPLETE + READY)
    c.attach(b)
    shared = c.client_chunk(parse(b"_pg3_0", b"select $1", (23,)) + describe(b"_pg3_0") + SYNC, b"I")
    assert shared.startswith(PARSE_NOTHING) and names(shared)[1] == names(first)[0]
    assert reg.shared_hits == 1
    assert feed(c, PARSE_COMPLETE + READY)[0] == PARSE_COMPLETE + READY
    other = c.client_chunk(parse(b"_pg3_1", b"select $1", (25,)) + SYNC, b"I")
    assert names(other)[0] != names(first)[0]


def test_eviction_closes_the_least_recently_used_and_swallows_its_close_complete() -> None:
    """Beyond the bound the least recently used statement is Closed before the new Parse (its
    CloseComplete swallowed), but never one used in the running transaction."""
    reg = StatementRegistry(1)
    relay = PreparedRelay(reg)
    be = backend()
    relay.attach(be)
    relay.client_chunk(parse(b"a", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    sent = relay.client_chunk(parse(b"b", b"select 2") + SYNC, b"I")
    assert kinds(sent) == "CPS" and reg.evictions == 1
    assert feed(relay, CLOSE_COMPLETE + PARSE_COMPLETE + READY)[0] == PARSE_COMPLETE + READY
    # Both used in one transaction: "a" comes back in place of "b", then "b" comes back and the
    # bound waits rather than close "a", which the transaction is using.
    tx = relay.client_chunk(bind(b"a") + EXECUTE + bind(b"b") + EXECUTE, b"T")
    assert kinds(tx) == "CPBEPBE" and reg.evictions == 2
    assert len(reg.of(be)) == 2


def test_an_error_skips_the_rest_of_the_batch_and_undoes_its_bookkeeping() -> None:
    """After an ErrorResponse the server skips to Sync: a client Parse of that batch is undone
    (its name unknown again, the backend without it), an injected Parse too, and what the client
    sends before its Sync is forwarded untouched."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b1, b2 = backend(), backend()
    relay.attach(b1)
    relay.client_chunk(parse(b"old", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    relay.attach(b2)
    sent = relay.client_chunk(
        bind(b"x") + EXECUTE + parse(b"new", b"select 2") + bind(b"old") + EXECUTE, b"I"
    )
    assert kinds(sent) == "BEPPBE"
    out, _ = feed(relay, ERROR)
    assert out == ERROR
    assert "new" not in {n.decode() for n in relay.statements}
    # Still in the failed batch: forwarded as is (the server skips it), no bookkeeping.
    late = bind(b"old") + EXECUTE
    assert relay.client_chunk(late + SYNC, b"I") == late + SYNC
    assert feed(relay, READY)[0] == READY
    # Next batch: b2 lacks "old" (its injected Parse was skipped), so it is injected again.
    again = relay.client_chunk(bind(b"old") + EXECUTE + SYNC, b"I")
    assert kinds(again) == "PBES"
    assert feed(relay, PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)[0].startswith(
        BIND_COMPLETE
    )


def test_close_is_answered_by_the_server_and_keeps_the_shared_statement() -> None:
    """Close of a client statement forgets the name (CLOSE_NOTHING keeps the server's reply in
    order) while the backend keeps the statement for other clients; a re-Parse of the name with
    other SQL is a new statement; a duplicate Parse is the server's own 42P05."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    relay.attach(backend())
    first = relay.client_chunk(parse(b"s", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    dup = relay.client_chunk(parse(b"s", b"select 2") + SYNC, b"I")
    assert names(dup) == names(first)[:1]  # the server answers "already exists"
    feed(relay, ERROR + READY)
    assert relay.client_chunk(close(b"s") + SYNC, b"I") == CLOSE_NOTHING + SYNC
    assert feed(relay, CLOSE_COMPLETE + READY)[0] == CLOSE_COMPLETE + READY
    assert b"s" not in relay.statements
    second = relay.client_chunk(parse(b"s", b"select 2") + SYNC, b"I")
    assert kinds(second) == "PS" and names(second) != names(first)[:1]


def test_deallocate_becomes_an_empty_query_and_its_reply_the_command_tag() -> None:
    """DEALLOCATE ALL / DEALLOCATE name of the client's statements never reach the server as
    such: an empty Query keeps the reply in order and EmptyQueryResponse turns into the tag;
    idle, it is answered with no backend at all."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    relay.attach(backend())
    relay.client_chunk(parse(b"_pg3_0", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    assert relay.client_chunk(pq.query("DEALLOCATE _pg3_0"), b"T") == EMPTY_QUERY
    out, _ = feed(relay, pq.message(ord("I")) + pq.ready_for_query(b"T"))
    assert out == pq.message(ord("C"), b"DEALLOCATE\x00") + pq.ready_for_query(b"T")
    assert relay.statements == {}
    # A name that is not the client's goes to the server (a PREPAREd one, or its 26000).
    assert relay.client_chunk(pq.query("deallocate other"), b"I") == pq.query("deallocate other")
    relay.statements[b"x"] = reg.statement(b"select 1\x00\x00\x00")
    idle = relay.deallocate_idle(b"DEALLOCATE ALL")
    assert idle == pq.message(ord("C"), b"DEALLOCATE ALL\x00") + READY and relay.statements == {}


def test_discard_all_forgets_the_backends_statements_and_settings_once_it_succeeded() -> None:
    """A client's DISCARD ALL runs on the server; when it succeeded the backend holds none of
    our statements and none of the client's settings, so both are prepared again."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b = backend()
    relay.attach(b)
    relay.client_chunk(parse(b"s", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    assert relay.client_chunk(pq.query("discard all"), b"I") == pq.query("discard all")
    feed(relay, pq.message(ord("C"), b"DISCARD ALL\x00") + READY)
    assert b.applied == {} and relay.statements == {} and len(reg.of(b)) == 0


def test_stale_plan_error_gives_later_parses_a_fresh_server_name() -> None:
    """0A000 "cached plan must not change result type" on a Bind renames the statement for new
    Parses (asyncpg re-prepares under a new client name with the same text)."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    relay.attach(backend())
    first = relay.client_chunk(parse(b"s1", b"select * from t") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    relay.client_chunk(bind(b"s1") + EXECUTE + SYNC, b"I")
    stale = pq.error_response("ERROR", "0A000", "cached plan must not change result type")
    feed(relay, stale + READY)
    again = relay.client_chunk(parse(b"s2", b"select * from t") + SYNC, b"I")
    assert kinds(again) == "PS" and names(again) != names(first)[:1]
    assert reg.invalidations == 1


def test_a_query_that_may_drop_statements_makes_the_backend_forget_them() -> None:
    """A Query mentioning DEALLOCATE or DISCARD in another form (several statements) goes to the
    server as is; once it succeeded the backend is taken to hold none of our statements (they
    are prepared again when used), while the client keeps its names."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b = backend()
    relay.attach(b)
    relay.client_chunk(parse(b"s", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    q = pq.query("select 1; DEALLOCATE ALL")
    assert relay.client_chunk(q, b"I") == q
    feed(relay, DATA_ROW + SELECT_1 + pq.message(ord("C"), b"DEALLOCATE ALL\x00") + READY)
    assert len(reg.of(b)) == 0 and b"s" in relay.statements
    assert kinds(relay.client_chunk(bind(b"s") + EXECUTE + SYNC, b"I")) == "PBES"


def test_the_unnamed_statement_follows_the_client_to_another_backend() -> None:
    """An unnamed statement parsed in one transaction and bound in a later one (asyncpg without
    a statement cache) is parsed again, ParseComplete swallowed, when the Bind reaches another
    backend, and after a shared Parse replaced it with PARSE_NOTHING; not within one attach."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b1, b2 = backend(), backend()
    relay.attach(b1)
    relay.client_chunk(parse(b"", b"select $1", (23,)) + describe(b"") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    assert kinds(relay.client_chunk(bind(b"") + EXECUTE + SYNC, b"I")) == "BES"
    feed(relay, BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)
    relay.attach(b2)
    sent = relay.client_chunk(bind(b"") + EXECUTE + SYNC, b"I")
    assert kinds(sent) == "PBES" and names(sent)[0] == b""
    out, _ = feed(relay, PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)
    assert out == BIND_COMPLETE + DATA_ROW + SELECT_1 + READY
    # Another client's statement is on b2; this client's Parse of it becomes PARSE_NOTHING,
    # which replaces the unnamed statement there: the next unnamed Bind parses it again.
    other = PreparedRelay(reg)
    other.attach(b2)
    other.client_chunk(parse(b"o", b"select 2") + SYNC, b"I")
    other.feed(PARSE_COMPLETE + READY)
    relay.attach(b2)
    assert kinds(relay.client_chunk(bind(b"") + EXECUTE + SYNC, b"I")) == "PBES"
    feed(relay, PARSE_COMPLETE + BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)
    assert kinds(relay.client_chunk(bind(b"") + EXECUTE + SYNC, b"I")) == "BES"
    feed(relay, BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)
    assert relay.client_chunk(parse(b"mine", b"select 2") + SYNC, b"I") == PARSE_NOTHING + SYNC
    feed(relay, PARSE_COMPLETE + READY)
    assert kinds(relay.client_chunk(bind(b"") + EXECUTE + SYNC, b"I")) == "PBES"


def test_the_follower_tells_the_session_what_the_scanner_would() -> None:
    """In the scanner's place, the relay reports the same things to the session: the count of
    ReadyForQuery and the last status, ParameterStatus, and every ErrorResponse (a FATAL one
    means the backend closes next, so the session must not add an error of its own), also
    when split across reads."""
    relay = PreparedRelay(StatementRegistry(10))
    relay.attach(backend())
    fatal = pq.error_response("FATAL", "57P01", "terminating connection due to administrator command")
    stream = pq.parameter_status("TimeZone", "UTC") + pq.ready_for_query(b"T") + READY + fatal
    for cut in range(1, len(stream)):
        relay.attach(backend())
        first, ready1 = relay.feed(stream[:cut])
        second, ready2 = relay.feed(stream[cut:])
        assert first + second == stream
        assert ready1 + ready2 == 2 and relay.status == b"I"
        assert [k for k, _ in relay.others] == [pq.PARAMETER_STATUS, pq.ERROR_RESPONSE]
        assert pq.is_fatal(relay.others[-1][1])
        relay.others.clear()
    assert relay.at_boundary


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (b"PREPARE foo AS select 1", ("prepare", b"foo", (), b"select 1")),
        (b"prepare Foo AS select 1", ("prepare", b"foo", (), b"select 1")),
        (b'PREPARE "Foo ""x""" AS select 1;', ("prepare", b'Foo "x"', (), b"select 1")),
        (
            b"/* c /* nested */ */ PREPARE q (int, text[], double precision, pg_catalog.uuid,"
            b" timestamp(3) with time zone, character varying(9)) AS select $1 -- tail",
            ("prepare", b"q", (23, 1009, 701, 2950, 1184, 1043), b"select $1 -- tail"),
        ),
        (
            b"PREPARE q AS select $x$ ; ' $x$ || E'\\'' ; -- after",
            ("prepare", b"q", (), b"select $x$ ; ' $x$ || E'\\'' "),
        ),
        (b"EXECUTE Foo(1, ';')", ("execute", b"foo")),
        (b"explain (costs off) execute foo", ("execute", b"foo")),
        (b"create table t as execute foo(1) with no data", ("execute", b"foo")),
        (b'DEALLOCATE PREPARE "A"', ("deallocate", b"A")),
        (b"deallocate all", ("deallocate", b"")),
        # Refused: the session keeps pinning as before.
        (b"PREPARE a AS select 1; select 2", None),
        (b"PREPARE a AS select 'x\\y'", None),  # meaning depends on standard_conforming_strings
        (b"PREPARE a (my_type) AS select $1", None),
        (b"PREPARE a (float(3)) AS select $1", None),  # float(p) picks the type by p
        (b"PREPARE a (numeric(0)) AS select $1", None),  # the server would refuse the typmod
        (b"PREPARE select AS select 1", None),  # a reserved keyword
        (b"PREPARE transaction AS select 1", None),
        (b'PREPARE U&"a" AS select 1', None),
        (b"PREPARE a AS select 'unterminated", None),
        (b"PREPARE a AS select 1 /* open", None),
        (b"PREPARE " + b"n" * 64 + b" AS select 1", None),  # PostgreSQL would truncate it
        (b"PREPARE caf\xc3\xa9 AS select 1", None),  # folding depends on the encoding
        (b"execute foo bar", None),
        (b"grant execute on function f() to x", None),
    ],
)
def test_the_lexer_reads_only_what_it_is_sure_of(sql: bytes, expected: tuple[object, ...] | None) -> None:
    """PREPARE / EXECUTE / DEALLOCATE are read as PostgreSQL would (names folded or unquoted,
    types as OIDs, comments and every kind of literal skipped); anything uncertain is None."""
    got = sqlprepare.read(sql + b"\x00")
    if expected is None:
        assert got is None
        return
    if isinstance(got, sqlprepare.Prepare):
        assert ("prepare", got.name, got.types, got.statement) == expected
    elif isinstance(got, sqlprepare.Execute):
        assert ("execute", got.name) == expected
        assert sql[got.name_start : got.name_end].lower().strip(b'"') == got.name.lower()
    else:
        assert isinstance(got, sqlprepare.Deallocate)
        assert ("deallocate", got.name) == expected


def _query_text(stream: bytes) -> list[bytes]:
    return [stream[s + 5 : e - 1] for k, s, e in pq.iter_messages(stream)[0] if k == pq.QUERY]


def test_sql_prepare_runs_under_the_server_name_and_execute_moves_to_another_backend() -> None:
    """PREPARE goes out under the shared server name (types pg_catalog-qualified); on a backend
    without it, EXECUTE is preceded by an injected Parse and Sync whose replies the client never
    sees; the server's errors name the client's statement; a second PREPARE of the same text on
    that backend is an empty query answered `PREPARE`."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b1, b2 = backend(), backend()
    relay.attach(b1)
    sent = relay.client_chunk(pq.query("PREPARE Q (int) AS select $1 + 1"), b"I")
    (text,) = _query_text(sent)
    server = text.split()[1]
    assert server.startswith(b"cm_") and text == b"PREPARE " + server + b" (pg_catalog.int4) AS select $1 + 1"
    prepared = pq.message(ord("C"), b"PREPARE\x00") + READY
    assert feed(relay, prepared)[0] == prepared
    assert set(relay.statements) == {b"q"}

    relay.attach(b2)
    sent = relay.client_chunk(pq.query("EXECUTE q(41)"), b"I")
    assert kinds(sent) == "PSQ" and names(sent) == [server]
    assert _query_text(sent) == [b"EXECUTE " + server + b"(41)"]
    result = DATA_ROW + SELECT_1 + READY
    out, events = feed(relay, PARSE_COMPLETE + READY[:3], READY[3:] + result)
    assert out == result and events == [pq.READY_FOR_QUERY]
    # The server's error names its statement; the client sees its own name.
    sent = relay.client_chunk(pq.query("EXECUTE q"), b"I")
    assert kinds(sent) == "Q"
    err = pq.error_response(
        "ERROR", "42601", f'wrong number of parameters for prepared statement "{server.decode()}"'
    )
    out, _ = feed(relay, err[:9], err[9:] + READY)
    assert b'"q"' in out and server not in out

    other = PreparedRelay(reg)
    other.attach(b2)
    assert other.client_chunk(pq.query("prepare mine (integer) as select $1 + 1"), b"I") == EMPTY_QUERY
    out, _ = feed(other, pq.message(ord("I")) + READY)
    assert out == prepared and reg.shared_hits == 1


def test_a_failed_sql_prepare_is_forgotten_and_a_duplicate_is_the_servers_own_error() -> None:
    """A PREPARE the server refuses leaves nothing behind; PREPARE of a name the client has goes
    to the server under the existing statement's server name, so its 42P05 comes from the server
    (after the server analysed the new text, as directly)."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    b = backend()
    relay.attach(b)
    relay.client_chunk(pq.query("PREPARE bad AS selec 1"), b"I")
    feed(relay, pq.error_response("ERROR", "42601", 'syntax error at or near "selec"') + READY)
    assert relay.statements == {} and len(reg.of(b)) == 0
    relay.client_chunk(pq.query("PREPARE good AS select 1"), b"I")
    feed(relay, pq.message(ord("C"), b"PREPARE\x00") + READY)
    server = relay.statements[b"good"].name
    sent = relay.client_chunk(pq.query("PREPARE good AS select 2"), b"I")
    assert _query_text(sent) == [b"PREPARE " + server + b" AS select 2"]
    out, _ = feed(
        relay,
        pq.error_response("ERROR", "42P05", f'prepared statement "{server.decode()}" already exists') + READY,
    )
    assert b'prepared statement "good" already exists' in out
    assert relay.statements[b"good"].name == server


def test_sql_and_protocol_statements_share_one_namespace() -> None:
    """As in PostgreSQL, EXECUTE runs a Parsed statement, Bind uses a PREPAREd one, and a Parse
    of a PREPAREd name is the server's own 42P05 (sent under the existing server name)."""
    reg = StatementRegistry(10)
    relay = PreparedRelay(reg)
    relay.attach(backend())
    relay.client_chunk(parse(b"s1", b"select 1") + SYNC, b"I")
    feed(relay, PARSE_COMPLETE + READY)
    s1 = relay.statements[b"s1"].name
    assert _query_text(relay.client_chunk(pq.query("EXECUTE s1"), b"I")) == [b"EXECUTE " + s1]
    feed(relay, DATA_ROW + SELECT_1 + READY)
    relay.client_chunk(pq.query("PREPARE q AS select 2"), b"I")
    feed(relay, pq.message(ord("C"), b"PREPARE\x00") + READY)
    q = relay.statements[b"q"].name
    assert names(relay.client_chunk(bind(b"q") + EXECUTE + SYNC, b"I")) == [q]
    feed(relay, BIND_COMPLETE + DATA_ROW + SELECT_1 + READY)
    assert names(relay.client_chunk(parse(b"q", b"select 3") + SYNC, b"I")) == [q]
