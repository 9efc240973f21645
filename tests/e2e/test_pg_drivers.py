"""The PostgreSQL driver matrix through a real mesh: every driver an application is likely to use
connects through the PG Gateway with TLS (verify-full against the gateway's CA) and SCRAM-SHA-256,
runs a parameterized query, reads a 4 MiB result, reuses a prepared statement across transactions,
rolls a transaction back, cancels a running pg_sleep with its own cancel API (57014), and, after
the database was stopped for being idle, wakes it on the next connect with the data intact.

The drivers other than psql and pgbench are programs that print one JSON line per check
(tests/clients/py_drivers.py, tests/clients/node/drivers.js, tests/clients/jdbc/Drivers.java);
node-postgres and the JDBC driver are installed by scripts/install-client-deps.sh, which the
`client_deps` fixture runs (idempotent and quick once installed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.databases import TenantDb, tenant_with_db
from tests.fixtures.mesh import ROOT, Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PG_BIN = "/usr/lib/postgresql/15/bin"
JDBC_JAR = "/usr/share/java/postgresql.jar"
LARGE = {"rows": 4096, "bytes": 4096 * 1024}
# main's prepared check writes v1, v2, v3 in three transactions, reading each back through the
# same prepared statement; wake reads v3 after the database was stopped and woken.
PREPARED = ["v1", "v2", "v3", "v3"]
RUN_TIMEOUT = 120.0
SLEEPERS_SQL = (
    "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"
)


@pytest.fixture(scope="module")
def client_deps() -> None:
    """node-postgres and the JDBC driver, installed on first use (apt and npm, idempotent)."""
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-client-deps.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def drvmesh(idle_mesh: Mesh) -> Mesh:
    """The shared mesh whose databases stop after 2 s without a connection."""
    return idle_mesh


def _ca(mesh: Mesh) -> str:
    return str(mesh.data_dir / "pggateway" / "ca.crt")


def _state(mesh: Mesh, t: TenantDb) -> str:
    with mesh.admin() as c:
        return str(c.get(f"/v2/tenants/{t.tenant}/dbs/app").json()["state"])


def _wait_state(mesh: Mesh, t: TenantDb, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _state(mesh, t) != state:
        assert time.monotonic() < deadline, f"database never became {state}"
        time.sleep(0.1)


def _target(mesh: Mesh, t: TenantDb) -> list[str]:
    # localhost: the name the gateway's certificate carries, so verify-full can check it.
    return ["localhost", mesh.env["CTRLMESH_PG_PORT"], t.pg_user, t.pg_password, "app", _ca(mesh)]


def _run(argv: list[str], env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run a driver program; its checks by name. A check that failed is kept with its error."""
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    checks = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            checks[d.pop("check")] = d
    assert r.returncode == 0 or checks, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    checks["_exit"] = {"code": r.returncode, "stderr": r.stderr[-2000:]}
    return checks


def _program(argv: list[str], env: dict[str, str] | None = None) -> Callable[[str, Mesh, TenantDb], Any]:
    return lambda phase, mesh, t: _run([*argv, phase, *_target(mesh, t)], env)


def _python(driver: str, impl: str | None = None) -> Callable[[str, Mesh, TenantDb], Any]:
    env = {"PSYCOPG_IMPL": impl} if impl else {}
    return _program([sys.executable, "-m", "tests.clients.py_drivers", driver], env)


# -- psql and pgbench: run here, reported in the same shape -------------------------------------


def _psql_env(mesh: Mesh, t: TenantDb) -> dict[str, str]:
    return {
        **os.environ,
        "PGHOST": "localhost",
        "PGPORT": mesh.env["CTRLMESH_PG_PORT"],
        "PGUSER": t.pg_user,
        "PGPASSWORD": t.pg_password,
        "PGDATABASE": "app",
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": _ca(mesh),
        "PGCONNECT_TIMEOUT": "45",
    }


def _psql_out(mesh: Mesh, t: TenantDb, sql: str) -> str:
    r = subprocess.run(
        [f"{PG_BIN}/psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=_psql_env(mesh, t),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def psql(phase: str, mesh: Mesh, t: TenantDb) -> dict[str, dict[str, Any]]:
    """psql 15 has no bind parameters (\\bind came in 16): its checks are the others, with
    SQL-level PREPARE/EXECUTE for the prepared statement and SIGINT (psql's cancel) for cancel."""
    if phase == "wake":
        return {"wake": {"value": _psql_out(mesh, t, "select v from kv where k = 1").strip()}}
    checks: dict[str, dict[str, Any]] = {}
    user, db = _psql_out(mesh, t, "select current_user, current_database()").strip().split("|")
    tls = "SSL connection" in _psql_out(mesh, t, "\\conninfo")
    checks["connect"] = {"user": user, "database": db, "tls": tls}
    _psql_out(mesh, t, "create table kv (k int primary key, v text); insert into kv values (1, 'v0')")
    rows = _psql_out(mesh, t, "select repeat('x', 1024) from generate_series(1, 4096)").splitlines()
    checks["large"] = {"rows": len(rows), "bytes": sum(len(r) for r in rows)}
    script = "prepare get_v(int) as select v from kv where k = $1;\n" + "".join(
        f"begin; update kv set v = 'v{i}' where k = 1; execute get_v(1); commit;\n" for i in (1, 2, 3)
    )
    checks["prepared"] = {"values": _psql_out(mesh, t, script + "execute get_v(1);").split()}
    n = _psql_out(
        mesh, t, "begin; insert into kv values (99, 'gone'); rollback; select count(*) from kv where k = 99"
    )
    checks["rollback"] = {"count": int(n)}
    sleeper = subprocess.Popen(
        [f"{PG_BIN}/psql", "-XAtq", "-v", "VERBOSITY=verbose", "-c", "select pg_sleep(30)"],
        env=_psql_env(mesh, t),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # SIGINT only once the server runs the sleep: a cancel before it would be lost.
        deadline = time.monotonic() + 10
        while _psql_out(mesh, t, SLEEPERS_SQL).strip() != "1" and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        sleeper.send_signal(signal.SIGINT)  # psql sends a CancelRequest for the running query
        _, err = sleeper.communicate(timeout=20)
    finally:
        sleeper.kill()
        sleeper.wait()
    code = "57014" if "57014: canceling statement due to user request" in err else err
    checks["cancel"] = {
        "sqlstate": code,
        "seconds": time.monotonic() - t0,
        "after": int(_psql_out(mesh, t, "select 1")),
    }
    return checks


def _count(out: str, what: str) -> int:
    """A number from pgbench's summary ("number of transactions actually processed: 400/400")."""
    m = re.search(rf"number of (?:\w+ )*?{what}[^:]*: (\d+)", out)
    assert m, out
    return int(m.group(1))


def pgbench(phase: str, mesh: Mesh, t: TenantDb) -> dict[str, dict[str, Any]]:
    """pgbench with -M prepared: its statements are prepared once per connection and reused by
    every transaction after that. Connecting shows only as its runs succeeding."""
    env = _psql_env(mesh, t)

    def bench(*args: str) -> str:
        r = subprocess.run(
            [f"{PG_BIN}/pgbench", *args, "app"], env=env, capture_output=True, text=True, timeout=90
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    checks: dict[str, dict[str, Any]] = {}
    if phase == "main":
        bench("-i", "-s", "1", "-q")
        out = bench("-n", "-M", "prepared", "-c", "2", "-t", "100")
        checks["prepared"] = {"processed": _count(out, "actually processed"), "failed": _count(out, "failed")}
    else:
        out = bench("-n", "-M", "prepared", "-S", "-c", "1", "-t", "20")
        accounts = _psql_out(mesh, t, "select count(*) from pgbench_accounts").strip()
        checks["wake"] = {"processed": _count(out, "actually processed"), "accounts": int(accounts)}
    return checks


DRIVERS: dict[str, Callable[[str, Mesh, TenantDb], dict[str, dict[str, Any]]]] = {
    "jdbc": _program(["java", "-cp", JDBC_JAR, str(ROOT / "tests" / "clients" / "jdbc" / "Drivers.java")]),
    "sqlalchemy-asyncpg": _python("sqlalchemy"),
    "psql": psql,
    "pgbench": pgbench,
    "node-pg": _program(["node", str(ROOT / "tests" / "clients" / "node" / "drivers.js")]),
    "psycopg-sync-binary": _python("psycopg-sync", "binary"),
    "psycopg-sync-libpq15": _python("psycopg-sync", "python"),
    "psycopg-async-binary": _python("psycopg-async", "binary"),
    "psycopg-async-libpq15": _python("psycopg-async", "python"),
    "asyncpg": _python("asyncpg"),
}
FULL = ["connect", "param", "large", "prepared", "rollback", "cancel"]
CHECKS = {"psql": [c for c in FULL if c != "param"], "pgbench": ["prepared"]}


@dataclass
class Run:
    """One driver's way through the matrix: its tenant, then each phase's checks."""

    tenant: Future[TenantDb] = field(default_factory=Future)
    main: Future[dict[str, dict[str, Any]]] = field(default_factory=Future)
    stopped: Future[None] = field(default_factory=Future)
    wake: Future[dict[str, dict[str, Any]]] = field(default_factory=Future)


class Matrix:
    """Runs every selected driver's phases in the background, a few drivers at a time: each
    driver has its own tenant and database, so one driver's idle stop never waits for another's,
    and the tests only assert on what each phase reported."""

    WORKERS = 3

    def __init__(self, mesh: Mesh, drivers: list[str]) -> None:
        self.mesh = mesh
        self.runs = {d: Run() for d in drivers}
        # Waiting for an idle stop costs no CPU: it has its own threads, so it never holds up
        # another driver's main phase.
        self.main_pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="driver-main")
        self.wake_pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="driver-wake")
        for d in drivers:
            self.main_pool.submit(self._guard, d, self._main)

    def _guard(self, driver: str, stage: Callable[[str, Run], None]) -> None:
        run = self.runs[driver]
        try:
            stage(driver, run)
        except BaseException as exc:  # handed to the test waiting for this stage and every later one
            first = True
            for f in (run.tenant, run.main, run.stopped, run.wake):
                if not f.done():
                    f.set_exception(exc if first else RuntimeError(f"an earlier stage failed: {exc!r}"))
                    first = False

    def _main(self, driver: str, run: Run) -> None:
        t = tenant_with_db(self.mesh)
        assert _state(self.mesh, t) == "stopped"  # so the first connect is also a wake
        run.tenant.set_result(t)
        run.main.set_result(DRIVERS[driver]("main", self.mesh, t))
        self.wake_pool.submit(self._guard, driver, self._wake)

    def _wake(self, driver: str, run: Run) -> None:
        t = run.tenant.result()
        _wait_state(self.mesh, t, "stopped", timeout=60)
        run.stopped.set_result(None)
        run.wake.set_result(DRIVERS[driver]("wake", self.mesh, t))

    def close(self) -> None:
        self.main_pool.shutdown(wait=True, cancel_futures=True)
        self.wake_pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def matrix(drvmesh: Mesh, client_deps: None, request: pytest.FixtureRequest) -> Iterator[Matrix]:
    selected = {
        item.callspec.params["driver"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    }
    # The slowest first, so the last to finish is a quick one.
    m = Matrix(drvmesh, [d for d in DRIVERS if d in selected])
    yield m
    m.close()


def _failures(checks: dict[str, dict[str, Any]]) -> str:
    return json.dumps({k: v for k, v in checks.items() if "error" in v or k == "_exit"}, indent=1)


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_driver_works_through_tls_scram_and_pooling(matrix: Matrix, driver: str) -> None:
    """The driver connects with verify-full TLS and SCRAM, binds parameters, reads 4 MiB, reuses
    a prepared statement in three transactions, sees its rollback undone, and cancels a pg_sleep
    with 57014 leaving the connection usable."""
    run = matrix.runs[driver]
    t, checks = run.tenant.result(RUN_TIMEOUT), run.main.result(RUN_TIMEOUT * 2)
    want = CHECKS.get(driver, FULL)
    assert [c for c in want if c not in checks or "error" in checks[c]] == [], _failures(checks)
    assert checks.get("_exit", {"code": 0})["code"] == 0, _failures(checks)
    if "connect" in want:
        assert checks["connect"]["user"] == t.pg_user and checks["connect"]["database"] == "app"
        assert checks["connect"].get("tls", True) is True  # JDBC cannot tell; verify-full needs TLS
    if driver.endswith("-libpq15"):  # Debian's libpq, not the wheel's: the one that hung before
        assert checks["connect"]["impl"] == "python" and checks["connect"]["libpq"] // 10000 == 15
    elif driver.startswith("psycopg"):
        assert checks["connect"]["impl"] == "binary"
    if "param" in want:
        assert checks["param"]["value"] == [42, "hi!"]
    if "large" in want:
        assert {k: checks["large"][k] for k in LARGE} == LARGE
    if driver == "pgbench":
        assert checks["prepared"] == {"processed": 200, "failed": 0}
    else:
        assert checks["prepared"]["values"] == PREPARED
        assert checks["prepared"].get("server_prepared", True) is True
        assert checks["rollback"] == {"count": 0}
        cancel = checks["cancel"]
        if driver == "sqlalchemy-asyncpg":
            # SQLAlchemy invalidates a connection whose task was cancelled: no SQLSTATE reaches
            # the application, but the backend stopped sleeping and the pool goes on.
            assert cancel["sleeping_after"] == 0, cancel
        else:
            assert cancel["sqlstate"] == "57014", cancel
        assert cancel["seconds"] < 10 and cancel["after"] == 1, cancel


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_driver_reconnects_after_the_database_stopped_idle(matrix: Matrix, driver: str) -> None:
    """After the database stopped for being idle (state `stopped` through the API), the driver's
    next connect wakes it and reads what it wrote before."""
    run = matrix.runs[driver]
    run.stopped.result(RUN_TIMEOUT * 3)
    checks = run.wake.result(RUN_TIMEOUT)
    assert "wake" in checks and "error" not in checks["wake"], _failures(checks)
    assert checks.get("_exit", {"code": 0})["code"] == 0, _failures(checks)
    if driver == "pgbench":
        assert checks["wake"] == {"processed": 20, "accounts": 100000}
    else:
        assert checks["wake"]["value"] == "v3"


def test_client_deps_are_where_the_drivers_expect_them(client_deps: None) -> None:
    """The install script leaves the JDBC jar, node-postgres at its locked version, and a JDK."""
    assert Path(JDBC_JAR).is_file()
    lock = json.loads((ROOT / "tests" / "clients" / "node" / "package-lock.json").read_text())
    installed = json.loads(
        (ROOT / "tests" / "clients" / "node" / "node_modules" / "pg" / "package.json").read_text()
    )
    assert installed["version"] == lock["packages"]["node_modules/pg"]["version"]
    r = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
