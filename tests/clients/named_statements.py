"""libpq's own named statements (PQprepare, PQexecPrepared, PQclosePrepared, PQdescribePrepared)
and DEALLOCATE / DISCARD ALL, against a DSN: the gateway must answer exactly as PostgreSQL does.

    python -m tests.clients.named_statements DSN

Run as its own process: libpq's blocking calls may hold the GIL, which an in-process gateway
needs. Prints `ok <check>` per check; an AssertionError exits non-zero.
"""

from __future__ import annotations

import sys

import psycopg
from psycopg import pq

OK = pq.ExecStatus.COMMAND_OK
ERR = pq.ExecStatus.FATAL_ERROR


def sqlstate(r: pq.abc.PGresult) -> bytes | None:
    return r.error_field(pq.DiagnosticField.SQLSTATE)


def close_and_reparse(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as other:
        pg = conn.pgconn
        assert pg.prepare(b"s1", b"select 'first'").status == OK
        assert pg.exec_prepared(b"s1", []).get_value(0, 0) == b"first"
        dup = pg.prepare(b"s1", b"select 'again'")
        assert dup.status == ERR and sqlstate(dup) == b"42P05", dup.error_message
        assert pg.close_prepared(b"s1").status == OK
        gone = pg.exec_prepared(b"s1", [])
        assert sqlstate(gone) == b"26000" and b'"s1"' in (gone.error_message or b""), gone.error_message
        assert pg.close_prepared(b"never").status == OK  # closing a missing name is no error
        assert pg.prepare(b"s1", b"select 'second', $1::int", [23]).status == OK
        # Another client's s1 is its own.
        assert other.pgconn.prepare(b"s1", b"select 'other'").status == OK
        assert other.pgconn.exec_prepared(b"s1", []).get_value(0, 0) == b"other"
        r = pg.exec_prepared(b"s1", [b"5"])
        assert (r.get_value(0, 0), r.get_value(0, 1)) == (b"second", b"5")
        desc = pg.describe_prepared(b"s1")
        assert (desc.nfields, desc.nparams, desc.param_type(0)) == (2, 1, 23)
    print("ok close and re-parse", flush=True)


def deallocate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        for conn in (a, b):
            assert conn.pgconn.prepare(b"q", b"select 40 + 2").status == OK
        for sql in (b"DEALLOCATE ALL", b"discard all", b"DEALLOCATE q"):
            r = a.pgconn.exec_(sql)
            assert r.status == OK, (sql, r.error_message)
            assert r.command_status == sql.upper().split(b" Q")[0], r.command_status
            gone = a.pgconn.exec_prepared(b"q", [])
            assert sqlstate(gone) == b"26000", (sql, gone.error_message)
            # b's identical statement (the same statement on the backends) is untouched.
            assert b.pgconn.exec_prepared(b"q", []).get_value(0, 0) == b"42", sql
            assert a.pgconn.prepare(b"q", b"select 40 + 2").status == OK
        # Inside a transaction, through the backend.
        assert a.pgconn.exec_(b"begin").status == OK
        assert a.pgconn.exec_(b"deallocate prepare q").command_status == b"DEALLOCATE"
        assert sqlstate(a.pgconn.exec_prepared(b"q", [])) == b"26000"
        assert sqlstate(a.pgconn.exec_(b"DEALLOCATE ALL")) == b"25P02"  # the failed transaction's
        assert a.pgconn.exec_(b"rollback").status == OK
        assert sqlstate(a.pgconn.exec_(b"DEALLOCATE nosuch")) == b"26000"
    print("ok deallocate", flush=True)


def unnamed_across_transactions(dsn: str) -> None:
    """The unnamed statement parsed in one batch and bound in the next (asyncpg with
    statement_cache_size=0 does this), while another client holds the backend it was parsed on
    (through a pool of two: the next batch runs on the other backend)."""
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        for i in range(3):
            assert a.pgconn.prepare(b"", b"select 'u', $1::int", [23]).status == OK
            assert b.pgconn.exec_(b"begin").status == OK
            assert b.pgconn.exec_(b"select 1").status == pq.ExecStatus.TUPLES_OK
            r = a.pgconn.exec_prepared(b"", [str(i).encode()])
            assert r.status == pq.ExecStatus.TUPLES_OK, r.error_message
            assert (r.get_value(0, 0), r.get_value(0, 1)) == (b"u", str(i).encode())
            assert b.pgconn.exec_(b"rollback").status == OK
            assert b.pgconn.exec_(b"begin").status == OK
            assert b.pgconn.exec_(b"select 1").status == pq.ExecStatus.TUPLES_OK
            assert a.pgconn.describe_prepared(b"").nparams == 1
            assert b.pgconn.exec_(b"rollback").status == OK
    print("ok unnamed across transactions", flush=True)


def main() -> None:
    dsn = sys.argv[1]
    close_and_reparse(dsn)
    deallocate(dsn)
    unnamed_across_transactions(dsn)


if __name__ == "__main__":
    main()
