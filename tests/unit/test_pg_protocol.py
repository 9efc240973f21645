"""The PG Gateway's protocol codec, SCRAM server, session-state classification and error mapping,
without sockets."""

from __future__ import annotations

import base64
import random

import grpc
import pytest
import scramp

from pggateway import classify, errors
from pggateway import protocol as pq
from pggateway.controlplane import ControlPlaneError
from pggateway.scram import SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer, Verifier
from pggateway.session import client_settings, settings_sql

# -- framing ----------------------------------------------------------------------------------


def test_message_framing_round_trips() -> None:
    """A typed message is type byte + int32 length (counting itself) + payload, and
    iter_messages splits a stream of them, leaving an incomplete tail for later."""
    q = pq.query("select 1")
    assert q[:1] == b"Q" and int.from_bytes(q[1:5], "big") == len(q) - 1 and q.endswith(b"\x00")
    stream = q + pq.message(pq.SYNC) + pq.message(pq.TERMINATE)
    msgs, used = pq.iter_messages(stream + q[:7])
    assert [chr(k) for k, _, _ in msgs] == ["Q", "S", "X"]
    assert used == len(stream)
    assert pq.parse_query(stream[5 : msgs[0][2]]) == "select 1"
    with pytest.raises(pq.ProtocolError):
        pq.iter_messages(b"Q\x00\x00\x00\x02")


def test_startup_packets_parse() -> None:
    """StartupMessage parameters, SSLRequest, GSSENCRequest and CancelRequest are recognised;
    a malformed or foreign-protocol packet is a protocol error."""
    packet = pq.startup_message({"user": "tnt_a", "database": "app", "application_name": "x y"})
    assert pq.startup_length(packet[:4]) == len(packet)
    parsed = pq.parse_startup(packet)
    assert parsed.code == pq.PROTOCOL_3_0 and (parsed.major, parsed.minor) == (3, 0)
    assert parsed.params == {"user": "tnt_a", "database": "app", "application_name": "x y"}
    assert pq.parse_startup(pq.ssl_request()).code == pq.SSL_REQUEST
    cancel = pq.parse_startup(pq.cancel_request(1234, -5))
    assert (cancel.code, cancel.pid, cancel.secret) == (pq.CANCEL_REQUEST, 1234, -5)
    with pytest.raises(pq.ProtocolError):
        pq.parse_startup((8).to_bytes(4, "big") + (2 << 16).to_bytes(4, "big"))
    with pytest.raises(pq.ProtocolError):
        pq.parse_startup(packet[:-1])  # the terminating empty name is missing
    with pytest.raises(pq.ProtocolError):
        pq.startup_length((pq.MAX_STARTUP_PACKET + 1).to_bytes(4, "big"))


def test_error_response_fields() -> None:
    """An ErrorResponse carries severity (S and V), SQLSTATE, message and the optional hint."""
    raw = pq.error_response("FATAL", "28P01", 'password authentication failed for user "u"', hint="h")
    assert raw[:1] == b"E"
    fields = pq.parse_fields(raw[5:])
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": 'password authentication failed for user "u"',
        "H": "h",
    }


def test_options_become_settings() -> None:
    """`options` (-c name=value, --name=value, escaped spaces) becomes GUC settings; other
    flags are ignored; names are validated."""
    assert pq.parse_options(r"-c search_path=a\ b --work-mem=4MB -c geqo=off -d 5") == {
        "search_path": "a b",
        "work_mem": "4MB",
        "geqo": "off",
    }
    settings = client_settings(
        {"user": "u", "database": "d", "application_name": "app", "options": "-c TimeZone=UTC"}
    )
    assert settings == {"application_name": ("application_name", "app"), "timezone": ("TimeZone", "UTC")}
    with pytest.raises(errors.PgError) as info:
        client_settings({"user": "u", "bad name; drop": "x"})
    assert info.value.sqlstate == "42704"


def test_settings_sql_sets_only_the_difference() -> None:
    """A backend is brought to a client's settings with SET for what differs and RESET for what
    the previous client set and this one did not, with identifiers and literals quoted."""
    want = {"application_name": ("application_name", "it's"), "timezone": ("TimeZone", "UTC")}
    assert settings_sql(want, {"timezone": "UTC", "datestyle": "ISO"}) == (
        """SET "application_name" TO 'it''s'; RESET "datestyle\""""
    )
    assert settings_sql(want, {"application_name": "it's", "timezone": "UTC"}) == ""


@pytest.mark.parametrize("seed", range(20))
def test_server_stream_scanner_survives_any_split(seed: int) -> None:
    """ReadyForQuery and ParameterStatus are found whatever the read boundaries, including a
    header split across reads and a large DataRow streamed in pieces."""
    stream = (
        pq.parameter_status("TimeZone", "UTC")
        + pq.message(ord("T"), b"\x00\x01x\x00" + bytes(18))
        + pq.message(ord("D"), b"\x00\x01" + (70000).to_bytes(4, "big") + b"z" * 70000)
        + pq.message(ord("C"), b"SELECT 1\x00")
        + pq.ready_for_query(b"T")
        + pq.ready_for_query(b"I")
    )
    rng = random.Random(seed)
    cuts = sorted([*rng.sample(range(1, len(stream)), 12), 1, 2, 3, 4, len(stream) - 1])
    scanner = pq.ServerStreamScanner()
    statuses: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut <= prev:
            continue
        ready = scanner.feed(stream[prev:cut])
        statuses += [b"?"] * (ready - 1) + [scanner.status] if ready else []
        prev = cut
    assert len(statuses) == 2 and statuses[-1] == b"I"
    assert scanner.others == [(pq.PARAMETER_STATUS, b"TimeZone\x00UTC\x00")]
    assert scanner.at_boundary
    assert scanner.feed(pq.error_response("FATAL", "57P01", "bye")) == 0
    assert pq.is_fatal(scanner.others[-1][1])


def test_parse_and_sasl_bodies() -> None:
    """Parse gives (statement name, query); SASLInitialResponse gives (mechanism, data)."""
    body = b"stmt1\x00select $1\x00\x00\x00"
    assert pq.parse_parse(body) == ("stmt1", "select $1")
    msg = pq.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert pq.parse_sasl_initial(msg[5:]) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(pq.ProtocolError):
        pq.parse_sasl_initial(b"SCRAM-SHA-256\x00\x00\x00\x00\x09short")


# -- session state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("select 1", None),
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 5;", None),
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 3;", None),
        ("BEGIN; SET LOCAL work_mem = '8MB'; SELECT 1; COMMIT", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("set constraints all deferred", None),
        ("SET statement_timeout = 5", classify.SET),
        ("  set session search_path to x", classify.SET),
        ("begin; set search_path = a; commit", classify.SET),
        ("RESET ALL", classify.SET),
        ("/* hi */ SET x.y = 1", classify.SET),
        ("-- comment\nSET x.y = 1", classify.SET),
        ("select 'set foo = 1'", None),
        ("select $$; set foo = 1$$", None),
        ("select E'it\\'s; set x = 1'", None),
        ('select 1 as "; set"', None),
        ("CREATE TEMP TABLE t (a int)", classify.TEMP_TABLE),
        ("create or replace temporary view v as select 1", classify.TEMP_TABLE),
        ("create global temporary table g (a int)", classify.TEMP_TABLE),
        ("create table temperature (a int)", None),
        ("select * into temp t from x", classify.TEMP_TABLE),
        ("LISTEN channel", classify.LISTEN),
        ("PREPARE p AS select 1", classify.PREPARE),
        ("PREPARE TRANSACTION 'x'", None),
        ("DECLARE c CURSOR WITH HOLD FOR select 1", classify.CURSOR_WITH_HOLD),
        ("DECLARE c CURSOR FOR select 1", None),
        ("select pg_advisory_lock(42)", classify.ADVISORY_LOCK),
        ("select pg_try_advisory_lock_shared(1, 2)", classify.ADVISORY_LOCK),
        ("select pg_advisory_xact_lock(42)", None),
        ("SELECT pg_catalog.set_config('search_path', '', false)", classify.SET_CONFIG),
        ("LOAD 'auto_explain'", classify.LOAD),
        ("DISCARD ALL", None),
        ("select 1 /* unterminated", None),
    ],
)
def test_session_state_classification(sql: str, reason: str | None) -> None:
    """Statements that leave session state pin the client; transaction-scoped ones and keywords
    inside literals, identifiers and comments do not."""
    assert classify.pin_reason_for_query(sql) == reason


def test_parse_classification() -> None:
    """A named statement pins whatever its text; an unnamed one pins only for its text."""
    assert classify.pin_reason_for_parse("s1", "select 1") == classify.NAMED_STATEMENT
    assert classify.pin_reason_for_parse("", "select $1") is None
    assert classify.pin_reason_for_parse("", "SET search_path = x") == classify.SET


def test_split_statements_handles_nested_comments_and_dollar_tags() -> None:
    """Statement splitting skips nested block comments and tagged dollar quotes."""
    sql = "select 1 /* a /* b; */ c; */; do $fn$ begin; end $fn$; set x = 1"
    assert classify.split_statements(sql) == [["select", "1"], ["do", "$"], ["set", "x", "=", "1"]]


# -- SCRAM ------------------------------------------------------------------------------------


def _exchange(server: ScramServer, client: scramp.ScramClient) -> bytes:
    first = server.server_first(client.get_client_first().encode())
    client.set_server_first(first.decode())
    final = server.server_final(client.get_client_final().encode())
    client.set_server_final(final.decode())
    return final


def test_scram_server_accepts_the_right_password_against_a_stored_verifier() -> None:
    """Our SCRAM server verifies a scramp client against a PostgreSQL-format verifier, with and
    without tls-server-end-point channel binding, and proves itself to the client."""
    verifier = Verifier.parse(Verifier.from_password("pw", iterations=4096).text())
    _exchange(ScramServer(SCRAM_SHA_256, verifier, None), scramp.ScramClient([SCRAM_SHA_256], "u", "pw"))
    cb = bytes(range(32))
    client = scramp.ScramClient([SCRAM_SHA_256_PLUS], "u", "pw", channel_binding=("tls-server-end-point", cb))
    _exchange(ScramServer(SCRAM_SHA_256_PLUS, verifier, cb), client)


def test_scram_server_accepts_the_empty_user_name_libpq_sends() -> None:
    """libpq sends `n=` (PostgreSQL authenticates the startup user, not the SCRAM one)."""
    verifier = Verifier.from_password("pw")
    server = ScramServer(SCRAM_SHA_256, verifier, b"x" * 32)
    nonce = "rOprNGfwEbeRWgbNEkqO"
    first = server.server_first(f"n,,n=,r={nonce}".encode()).decode()
    attrs = dict(p.split("=", 1) for p in first.split(","))
    assert attrs["r"].startswith(nonce)
    assert base64.b64decode(attrs["s"]) == verifier.salt and attrs["i"] == "4096"


@pytest.mark.parametrize("case", ["wrong_password", "wrong_binding", "downgrade", "decoy"])
def test_scram_server_refuses(case: str) -> None:
    """A wrong password, a channel-binding mismatch, a downgrade (client says `y` while the
    server binds) and a decoy verifier for an unknown user all fail."""
    verifier = Verifier.from_password("pw")
    if case == "wrong_password":
        server = ScramServer(SCRAM_SHA_256, verifier, None)
        client = scramp.ScramClient([SCRAM_SHA_256], "u", "not-pw")
    elif case == "wrong_binding":
        server = ScramServer(SCRAM_SHA_256_PLUS, verifier, b"a" * 32)
        client = scramp.ScramClient(
            [SCRAM_SHA_256_PLUS], "u", "pw", channel_binding=("tls-server-end-point", b"b" * 32)
        )
    elif case == "downgrade":
        server = ScramServer(SCRAM_SHA_256, verifier, b"a" * 32)
        with pytest.raises(ScramError):
            server.server_first(b"y,,n=,r=abcdef")
        return
    else:
        server = ScramServer(SCRAM_SHA_256, Verifier.decoy(b"k" * 32, "ghost"), None)
        client = scramp.ScramClient([SCRAM_SHA_256], "u", "pw")
        assert Verifier.decoy(b"k" * 32, "ghost").salt == Verifier.decoy(b"k" * 32, "ghost").salt
    with pytest.raises(ScramError):
        _exchange(server, client)


def test_malformed_verifier_is_an_error() -> None:
    """A verifier not in PostgreSQL's SCRAM-SHA-256 format is rejected, not half-parsed."""
    for bad in ("md5abc", "SCRAM-SHA-1$4096:c2FsdA==$a:b", "SCRAM-SHA-256$x:c2FsdA==$a:b"):
        with pytest.raises(ScramError):
            Verifier.parse(bad)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "acquiring", "sqlstate", "kind"),
    [
        (grpc.StatusCode.NOT_FOUND, "NotFound", True, "3D000", errors.USER),
        (grpc.StatusCode.NOT_FOUND, "NotFound", False, "28P01", errors.USER),
        (grpc.StatusCode.UNAVAILABLE, None, True, "57P03", errors.CONTROL_PLANE),
        (grpc.StatusCode.UNAVAILABLE, "ProviderUnavailable", True, "57P03", errors.COMPUTE),
        (grpc.StatusCode.FAILED_PRECONDITION, "LimitExceeded", True, "53400", errors.QUOTA),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "QuotaExceeded", True, "53400", errors.QUOTA),
        (grpc.StatusCode.FAILED_PRECONDITION, "InvalidState", True, "57P03", errors.COMPUTE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, True, "57P03", errors.COMPUTE),
        (grpc.StatusCode.PERMISSION_DENIED, "Forbidden", True, "28000", errors.USER),
        (grpc.StatusCode.PERMISSION_DENIED, "Forbidden", False, "XX000", errors.GATEWAY),
        (grpc.StatusCode.UNAVAILABLE, "Unavailable", True, "57P03", errors.COMPUTE),
        (grpc.StatusCode.INTERNAL, "Internal", False, "XX000", errors.GATEWAY),
    ],
)
def test_control_plane_errors_map_to_sqlstates(
    code: grpc.StatusCode, reason: str | None, acquiring: bool, sqlstate: str, kind: str
) -> None:
    """Every control-plane answer becomes one PostgreSQL error, with no service text in it."""
    err = errors.from_control_plane(
        ControlPlaneError(code, reason, "secret detail 10.0.0.7:5432"),
        user="u",
        database="d",
        acquiring=acquiring,
    )
    assert (err.sqlstate, err.kind) == (sqlstate, kind)
    assert "10.0.0.7" not in err.message and "secret" not in err.message


def test_compute_errors_pass_through_only_the_clients_own() -> None:
    """A bad parameter value (class 22) reaches the client verbatim; a compute-side login
    failure becomes a generic 08004 without the compute's words."""
    assert (
        errors.from_compute({"C": "22023", "M": 'invalid value for parameter "TimeZone": "x"'}).sqlstate
        == "22023"
    )
    rejected = errors.from_compute({"C": "28P01", "M": "password authentication failed for user on 10.1.2.3"})
    assert rejected.sqlstate == "08004" and "10.1.2.3" not in rejected.message
