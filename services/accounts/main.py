"""The accounts service process: `python -m services.accounts.main`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from libs import keys
from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.reconcile import every
from libs.service_main import Runtime, run
from services.accounts import servicer
from services.accounts.domain import AccountsDomain
from services.accounts.models import SCHEMA, outbox
from services.accounts.peers import Peers

log = logging.getLogger("ctrlmesh.accounts")

ADMIN_KEY_FILE = "admin-api-key"


def _write_admin_key(rt: Runtime, token: str) -> None:
    path = rt.settings.data_dir / ADMIN_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("generated the first global admin API key into %s", path)


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    domain = AccountsDomain.build(
        rt.db,
        keys.keyring(rt.settings),
        Outbox(outbox, rt.db),
        Peers(rt.channels, rt.signer),
        dsn_host=rt.settings.public_pg_host,
        dsn_port=rt.settings.pg_port,
    )

    async def on_start() -> None:
        token = await domain.accounts.bootstrap(rt.settings.admin_email, rt.settings.bootstrap_admin_key)
        if token:
            _write_admin_key(rt, token)

    async def reconcile() -> None:
        """Finish cascading tenant deletes, including ones a previous process left half done."""
        await every("tenant-delete-reconcile", 1.0, domain.tenants.reconcile_deleting, jitter=0.0, first=0.0)

    async def sink(entry: dict[str, Any]) -> None:
        await domain.audit.record(entry)

    service = Service(
        name="accounts",
        register=lambda server: servicer.register(server, domain),
        on_start=on_start,
        background=[reconcile],
        events=domain.outbox,
    )
    return service, sink


if __name__ == "__main__":
    run("accounts", SCHEMA, Path(__file__).parent / "migrations", build)
