"""SQL-level PREPARE / EXECUTE / DEALLOCATE through the PG Gateway's transaction pooling, against a
real PostgreSQL compute and real clients (psycopg, psql), over TLS.

The gateway reads such a statement with its own lexer (pggateway/sqlprepare.py), keeps it with
the client's protocol-level statements, and prepares it under its own name on whichever backend
serves the next transaction (pggateway/prepared.py). Every answer is compared with the same
client talking to PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.test_pggateway import PASSWORD, USER, GatewayThread, _pg_tool
from tests.integration.test_pggateway_prepared import Stand

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    s = Stand(tmp_path_factory.mktemp("pggw-sql-prepare"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def gw(stand: Stand) -> GatewayThread:
    return stand.gateway()


def _outcome(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    """The rows of a statement, or its error as (SQLSTATE, message)."""
    try:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else cur.statusmessage
    except psycopg.Error as exc:
        return (exc.sqlstate, exc.diag.message_primary)


def _session(dsn: str, pids: set[int]) -> list[Any]:
    """One client's PREPARE / EXECUTE / DEALLOCATE story; a second connection holds a backend in a
    transaction now and then, so through the gateway the statements must move between the two."""
    out: list[Any] = []
    # No automatic preparation: psycopg would send DEALLOCATE ALL after each ROLLBACK.
    with (
        psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn,
        psycopg.connect(dsn) as holder,
    ):
        run = lambda sql, params=None: out.append(_outcome(conn, sql, params))  # noqa: E731
        run("PREPARE twice (int, text) AS SELECT $1 * 2, upper($2)")
        run("EXECUTE twice(21, 'a')")
        for i in range(6):
            if i % 2 == 0:
                holder.execute("select 1")  # holds the warmest backend in a transaction
            row = conn.execute(f"EXECUTE twice({i}, 'x')").fetchone()
            assert row == (2 * i, "X")
            pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            holder.rollback()
        run("PREPARE twice AS SELECT 1")  # 42P05 duplicate_prepared_statement
        run("PREPARE twice AS SELECT no_such_column")  # analysed before the name is checked
        run("EXECUTE nothing_here")  # 26000 invalid_sql_statement_name
        run("DEALLOCATE nothing_here")
        run("EXECUTE twice(1)")  # wrong number of parameters, named by the client's name
        run("EXECUTE twice(%s, %s)", (4, "b"))  # an unnamed Parse of EXECUTE: extended protocol
        holder.execute("select 1")
        run("EXECUTE twice(%s::int, %s::text)", (4, "b"))  # the same, on the other backend
        holder.rollback()
        run("PREPARE \"Mixed Case\" AS SELECT 'quoted'")
        run('EXECUTE "Mixed Case"')
        run("EXECUTE mixed_case")
        run("PREPARE MixedUnquoted AS SELECT 'folded'")
        run("EXECUTE mixedunquoted")
        run('EXECUTE "MixedUnquoted"')
        run("/* a comment */ PREPARE semi AS SELECT ';' -- and another\n;")
        run("EXECUTE semi;")
        run("PREPARE dollar AS SELECT $q$ it's; $q$ || $1::text")
        run("EXECUTE dollar('x')")
        run("PREPARE broken AS SELEC 1")  # a syntax error: nothing is kept
        run("EXECUTE broken")
        # A PREPARE inside a transaction that rolls back: PostgreSQL keeps the statement.
        conn.autocommit = False
        run("PREPARE in_tx AS SELECT 'kept'")
        conn.rollback()
        run("EXECUTE in_tx")
        conn.rollback()
        # In a failed transaction every one of them is 25P02, and nothing is kept.
        run("select 1 / 0")
        run("PREPARE after_error AS SELECT 1")
        run("EXECUTE in_tx")
        run("DEALLOCATE in_tx")
        conn.rollback()
        run("EXECUTE after_error")
        run("EXECUTE in_tx")
        conn.commit()
        conn.autocommit = True
        run("EXPLAIN (COSTS OFF) EXECUTE twice(1, 'a')")
        run("DEALLOCATE PREPARE twice")
        run("EXECUTE twice(1, 'a')")
        run("DEALLOCATE ALL")
        run("EXECUTE in_tx")
        run('EXECUTE "Mixed Case"')
        run("PREPARE twice AS SELECT 'new text'")  # the name is free again
        run("EXECUTE twice")
    return out


def test_psycopg_prepare_execute_deallocate_answer_as_directly_without_pinning(
    stand: Stand, gw: GatewayThread
) -> None:
    """PREPARE / EXECUTE / DEALLOCATE (types, quoted and folded names, comments, dollar quotes,
    duplicates, unknown names, a rolled-back and a failed transaction, DEALLOCATE ALL, EXPLAIN
    EXECUTE, EXECUTE with bound parameters) give exactly PostgreSQL's answers and SQLSTATEs through
    the gateway, the statements run on both backends, and no session pins."""
    pins = gw.metric("pggateway_pins_total", reason="prepare")
    direct = _session(stand.direct_dsn(), set())
    pids: set[int] = set()
    through = _session(stand.dsn(gw), pids)
    assert through == direct
    # The expected answers are PostgreSQL's own; a few spelled out so a change in both shows.
    assert ("42P05", 'prepared statement "twice" already exists') in direct
    assert ("26000", 'prepared statement "nothing_here" does not exist') in direct
    assert [("kept",)] in direct  # survived the ROLLBACK
    assert len(pids) == 2, pids
    assert gw.metric("pggateway_pins_total", reason="prepare") == pins
    assert gw.metric("pggateway_pinned_sessions") == 0


def test_many_clients_share_sql_prepared_statements_over_a_small_pool(
    stand: Stand, gw: GatewayThread
) -> None:
    """Six psycopg clients PREPARE the same statement and EXECUTE it in many transactions over two
    backends, two of them with every query prepared by psycopg (a named Parse of `EXECUTE
    add_one(…)`, which runs the SQL-prepared statement): results are right, nothing pins, and
    identical statements are one per backend."""
    dsn = stand.dsn(gw)
    hits = gw.metric("pggateway_prepared_shared_hits_total")
    errors: list[BaseException] = []
    max_pinned = [0.0]

    def client(i: int) -> None:
        try:
            with psycopg.connect(dsn, prepare_threshold=0 if i % 3 == 0 else 5) as conn:
                # prepare=False: psycopg would send the PREPARE itself in a named Parse, which
                # pins (the gateway reads PREPARE only in a simple Query).
                conn.execute("PREPARE add_one (bigint) AS SELECT $1 + 1", prepare=False)
                conn.commit()
                for n in range(30):
                    assert conn.execute(f"EXECUTE add_one({n % 4 * i})").fetchone() == (n % 4 * i + 1,)
                    conn.commit()
                    max_pinned[0] = max(max_pinned[0], gw.metric("pggateway_pinned_sessions"))
                conn.execute("DEALLOCATE add_one")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not errors, errors
    assert max_pinned[0] == 0
    assert gw.metric("pggateway_prepared_shared_hits_total") > hits


def _prepared_by_psycopg(dsn: str) -> list[Any]:
    """psycopg preparing every statement itself (prepare_threshold=0): EXECUTE and DEALLOCATE
    arrive as named Parses whose text names the client's SQL-prepared statement."""
    out: list[Any] = []
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn, psycopg.connect(dsn) as holder:
        run = lambda sql, params=None: out.append(_outcome(conn, sql, params))  # noqa: E731
        conn.execute("PREPARE p (int) AS SELECT $1 * 10", prepare=False)
        for i in range(4):
            if i % 2:
                holder.execute("select 1")
            run("EXECUTE p(3)")
            holder.rollback()
        run("DEALLOCATE p")
        run("EXECUTE p(3)")
        conn.execute("PREPARE p (int) AS SELECT $1 * 100", prepare=False)
        run("EXECUTE p(3)")  # the same text as before: psycopg's statement, the new p
        run("DEALLOCATE ALL")
        run("EXECUTE p(3)")
    return out


def test_psycopg_preparing_execute_and_deallocate_answers_as_directly(
    stand: Stand, gw: GatewayThread
) -> None:
    """With psycopg's prepare_threshold=0, `EXECUTE p(…)` and `DEALLOCATE p` / `DEALLOCATE ALL`
    come as named Parses; through the gateway they run p on either backend and forget it exactly
    as directly, without pinning."""
    pins = gw.metric("pggateway_pins_total", reason="prepare")
    direct = _prepared_by_psycopg(stand.direct_dsn())
    assert _prepared_by_psycopg(stand.dsn(gw)) == direct
    assert direct[0] == [(30,)] and direct[-1][0] == "26000"
    assert gw.metric("pggateway_pins_total", reason="prepare") == pins


def _asyncpg_story(dsn: str) -> list[Any]:
    """asyncpg: PREPARE / DEALLOCATE as simple queries, EXECUTE through its own statement cache
    (a named Parse of `EXECUTE q(…)`), with a second connection holding a backend now and then."""

    async def run() -> list[Any]:
        out: list[Any] = []
        conn = await asyncpg.connect(dsn)
        holder = await asyncpg.connect(dsn)
        try:
            await conn.execute("PREPARE q (int) AS SELECT $1 + 100")
            for i in range(4):
                tx = holder.transaction()
                if i % 2:
                    await tx.start()
                    await holder.execute("select 1")
                out.append(await conn.fetchval("EXECUTE q(2)"))
                if i % 2:
                    await tx.rollback()
            out.append(await conn.execute("DEALLOCATE q"))
            try:
                await conn.fetchval("EXECUTE q(2)")
            except asyncpg.PostgresError as exc:
                out.append((exc.sqlstate, str(exc)))
        finally:
            await conn.close()
            await holder.close()
        return out

    return asyncio.run(run())


def test_asyncpg_statement_cache_runs_sql_prepared_statements_as_directly(
    stand: Stand, gw: GatewayThread
) -> None:
    """asyncpg's cached `EXECUTE q(2)` runs the SQL-prepared q on either backend and fails with
    PostgreSQL's own 26000 once q is deallocated, exactly as directly, without pinning."""
    pins = gw.metric("pggateway_pins_total", reason="prepare")
    direct = _asyncpg_story(stand.direct_dsn())
    assert _asyncpg_story(stand.dsn(gw)) == direct
    assert direct[:4] == [102] * 4 and direct[-1][0] == "26000"
    assert gw.metric("pggateway_pins_total", reason="prepare") == pins


_PSQL_SCRIPT = """\
PREPARE p1 (integer, text) AS SELECT $1 + 1 AS n, upper($2) AS s;
EXECUTE p1(1, 'a');
BEGIN;
PREPARE p2 AS SELECT 'two'::text;
ROLLBACK;
EXECUTE p2;
EXECUTE p1(41, 'b');
DEALLOCATE p1;
EXECUTE p1(1, 'a');
PREPARE p2 AS SELECT 2;
DEALLOCATE ALL;
EXECUTE p2;
"""


def test_psql_script_answers_as_directly(stand: Stand, gw: GatewayThread) -> None:
    """A psql script of PREPARE / EXECUTE / DEALLOCATE (each statement its own Query) prints the
    same rows and the same errors through the gateway as directly, and does not pin."""
    base = {**os.environ, "PGPASSWORD": PASSWORD, "PGUSER": USER}

    def run(port: int, sslmode: str) -> str:
        r = subprocess.run(
            [_pg_tool("psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "app"],
            input=_PSQL_SCRIPT,
            env={**base, "PGSSLMODE": sslmode},
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.stdout + r.stderr

    pins = gw.metric("pggateway_pins_total", reason="prepare")
    direct = run(stand.compute.port, "disable")
    through = run(gw.port, "require")
    assert gw.metric("pggateway_pins_total", reason="prepare") == pins
    assert through == direct
    assert 'ERROR:  prepared statement "p1" does not exist' in direct
    assert "two" in direct and "42|B" in direct
    assert gw.metric("pggateway_pinned_sessions") == 0


@pytest.mark.parametrize(
    "sql",
    [
        "PREPARE two AS SELECT 1; SELECT 2",  # several statements in one Query
        "PREPARE typed (my_own_type) AS SELECT $1",  # a type the gateway cannot resolve alone
        "PREPARE slash AS SELECT 'a\\b'",  # a backslash in a plain literal
    ],
)
def test_a_prepare_the_lexer_refuses_still_pins(stand: Stand, gw: GatewayThread, sql: str) -> None:
    """A PREPARE the gateway cannot read with certainty pins the session (reason "prepare"), and
    the statement then works on the pinned backend as directly."""
    pins = gw.metric("pggateway_pins_total", reason="prepare")
    with psycopg.connect(stand.dsn(gw), autocommit=True) as conn:
        if "my_own_type" in sql:
            conn.execute("drop domain if exists my_own_type")
            conn.execute("create domain my_own_type as int")
        conn.execute(sql)
        assert gw.metric("pggateway_pins_total", reason="prepare") == pins + 1
        assert gw.metric("pggateway_pinned_sessions") == 1
        name = sql.split()[1]
        args = "(5)" if "typed" in sql else ""
        assert conn.execute(f"EXECUTE {name}{args}").fetchone() is not None
        conn.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute(f"EXECUTE {name}{args}")
    deadline = time.monotonic() + 5
    while gw.metric("pggateway_pinned_sessions") and time.monotonic() < deadline:
        time.sleep(0.01)  # the gateway ends the session when it sees the client go
    assert gw.metric("pggateway_pinned_sessions") == 0
