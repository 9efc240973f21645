"""Break-glass: `python -m libs.admin_key` (or `make admin-key`) mints a new global API key
straight into the control-plane database, for an operator who has lost every global key.

It reads the same settings and data directory as the launcher: CTRLMESH_DATABASE_URL when set,
otherwise the embedded PostgreSQL under the data directory (used while the platform runs, or
started for the moment and stopped again when it does not). Whoever can run this can read the
database anyway, so it asks for nothing more. The key is printed once on stdout and never
stored; the creation is in the audit log (action `break_glass_create`) and the event stream.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import socket
import sys
from pathlib import Path

from libs.db import Database, make_engine, migrate
from libs.embedded_pg import EmbeddedPostgres
from libs.errors import CtrlmeshError
from libs.outbox import Outbox
from libs.settings import Settings

log = logging.getLogger("ctrlmesh.admin_key")

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "accounts" / "migrations"


async def mint(database_url: str, name: str, actor: str) -> tuple[str, str]:
    """(key id, token) of a new global key in the platform account."""
    # The accounts service's own rules and tables; imported here so `libs` stays importable
    # without the services for every other use.
    from services.accounts.account import Accounts
    from services.accounts.models import SCHEMA, outbox

    engine = make_engine(database_url, pool_size=1)
    try:
        # The schema as the running service expects it (a no-op unless this is newer code).
        await migrate(engine, SCHEMA, MIGRATIONS)
        db = Database(engine)
        key, token = await Accounts(db, Outbox(outbox, db)).mint_break_glass_key(name, actor)
        return key.id, token
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libs.admin_key", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="break-glass admin", help="the new key's name")
    args = parser.parse_args(argv)
    settings = Settings.load()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    actor = f"break-glass:{getpass.getuser()}@{socket.gethostname()}"
    pg: EmbeddedPostgres | None = None
    started = False
    url = settings.database_url
    if not url:
        pg = EmbeddedPostgres(settings.data_dir / "pg", port=settings.embedded_pg_port)
        if not (pg.cluster_dir / "PG_VERSION").exists():
            log.error("no control-plane database under %s: start the platform once first", settings.data_dir)
            return 2
        started = not pg.is_running()
        pg.start()
        url = pg.url_for("ctrlmesh")
    try:
        key_id, token = asyncio.run(mint(url, args.name, actor))
    except CtrlmeshError as err:
        log.error("%s", err.message)
        return 2
    finally:
        if pg is not None and started:
            pg.stop()
    log.info("minted global API key %s (%r) for %s; it is shown once, below", key_id, args.name, actor)
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
