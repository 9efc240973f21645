"""Instantiating a template: parameters validated, the instance created through the instances
service's API (with the caller's principal: its quota and visibility apply), the managed
database created and bound when the template asks, and the first deployment unless
`deploy` is false (then the app is created with no replica running and no deployment). The
deployment rolls onto a running instance, so instantiate waits (at most `start_timeout`) for
the new instance to run first.

A failure half-way undoes what was made, newest first, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ctrlmesh.instances.v1 import instances_pb2
from google.protobuf import json_format

from libs import principal as principals
from libs.errors import InvalidArgument, InvalidState, not_found
from libs.ids import is_uuid
from libs.outbox import Outbox
from services.clusters import events
from services.clusters import repository as repo
from services.clusters import templates as catalog
from services.clusters.domain import LOCAL
from services.clusters.managed import ManagedDatabases, View
from services.clusters.peers import Instances
from services.clusters.templates import Template

log = logging.getLogger("ctrlmesh.clusters.templates")


@dataclass
class Instantiated:
    app: instances_pb2.Instance
    deployment: instances_pb2.Deployment | None
    database: View | None


class TemplatesDomain:
    def __init__(
        self,
        db: Any,
        outbox: Outbox,
        instances: Instances,
        managed: ManagedDatabases,
        catalog_: dict[str, Template] | None = None,
        start_timeout: float = 10.0,
    ):
        self.start_timeout = start_timeout
        self.db = db
        self.outbox = outbox
        self.instances = instances
        self.managed = managed
        self.catalog = catalog_ if catalog_ is not None else catalog.load()

    def list(self, category: str = "") -> list[Template]:
        return [t for t in self.catalog.values() if not category or t.category == category]

    def get(self, template_id: str) -> Template:
        t = self.catalog.get(template_id) if is_uuid(template_id) else None
        if t is None:
            raise not_found("template", template_id)
        return t

    async def _running(self, p: principals.Principal, app_id: str) -> None:
        """Wait for the new app to run (a deployment rolls onto a running instance)."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            app = await self.instances.get(p, app_id)
            if app.state == "running":
                return
            if app.state in ("failed", "stopped", "destroying", "destroyed"):
                raise InvalidState(
                    f"the new app did not start ({app.state}: {app.state_reason or 'no reason given'})",
                    details={"state": app.state},
                )
            if time.monotonic() > deadline:
                raise InvalidState(
                    f"the new app did not start within {self.start_timeout:g}s"
                    + (f" ({app.state_reason})" if app.state_reason else ""),
                    details={"state": app.state},
                )
            await asyncio.sleep(0.2)

    def create_request(
        self, t: Template, values: dict[str, Any], name: str, tenant_id: str, deploy: bool
    ) -> instances_pb2.CreateInstanceRequest:
        spec = catalog.render(t.spec, {**values, "name": name})
        spec.update(name=name)
        if tenant_id:
            spec["tenant_id"] = tenant_id
        if not deploy:
            spec["replicas"] = 0
        req = instances_pb2.CreateInstanceRequest()
        try:
            json_format.ParseDict(spec, req)
        except json_format.ParseError as err:
            raise InvalidArgument(
                f"template {t.slug!r} does not render to an instance with these parameters: {err}",
                fields={"parameters": "the rendered instance spec is invalid"},
            ) from None
        return req

    async def instantiate(
        self,
        p: principals.Principal,
        template_id: str,
        *,
        name: str,
        parameters: dict[str, Any],
        deploy: bool,
        tenant_id: str,
    ) -> Instantiated:
        t = self.get(template_id)
        values = catalog.validate(t, parameters)
        if p.scope != "tenant" and not tenant_id:
            raise InvalidArgument(
                "tenant_id is required for this key", fields={"tenant_id": "required for this key"}
            )
        if p.scope == "tenant" and tenant_id and tenant_id != p.tenant_id:
            raise not_found("tenant", tenant_id)  # another tenant reads as none at all
        name = name or f"{t.slug}-{pysecrets.token_hex(3)}"
        req = self.create_request(t, values, name, "" if p.scope == "tenant" else tenant_id, deploy)
        undo: list[Callable[[], Awaitable[None]]] = []
        # Journaled: a process killed half-way leaves its app and database to the next start to
        # undo, as the failure path below does in process (services/clusters/intents.py).
        intent = await self.managed.intents.begin(
            "instantiate", p.tenant_id if p.scope == "tenant" else tenant_id, app_name=name
        )
        try:
            app = await self.instances.create(p, req)
            undo.append(lambda: self.instances.delete(p, app.id))
            await self.managed.intents.note(intent, app_id=app.id)
            database: View | None = None
            if t.database:
                async with self.db.session() as s:
                    cluster = await repo.cluster_by_name(s, LOCAL)
                assert cluster is not None
                database = await self.managed.create(
                    p,
                    cluster_id=cluster.id,
                    name=str(values.get("database_name") or name),
                    engine="postgres",
                    version="",
                    tenant_id=app.tenant_id if p.scope != "tenant" else "",
                )
                md_id = database.row.id
                undo.append(lambda: self.managed.delete(p, md_id, force=True))
                await self.managed.intents.note(intent, pg_name=database.row.pg_name)
                database = await self.managed.bind(p, md_id, app.id, restart=False)
            deployment = None
            if deploy:
                await self._running(p, app.id)
                deployment = await self.instances.deploy(
                    p,
                    instances_pb2.DeployRequest(
                        id=app.id, image=req.image, notes=f"template {t.slug} {t.version}"
                    ),
                )
            app = await self.instances.get(p, app.id)
        except BaseException:
            for step in reversed(undo):
                try:
                    await step()
                except Exception:
                    log.warning("undoing a half-made instantiation of %s failed", t.slug, exc_info=True)
            await self.managed.intents.finish(intent)
            raise
        tenant = await self.managed.accounts.resolve_tenant(
            principals.system_principal("clusters"), app.tenant_id
        )
        async with self.outbox.session() as s:
            await self.managed.intents.finish_in(s, intent)
            await events.publish(
                self.outbox,
                s,
                events.TEMPLATE_INSTANTIATED,
                "template",
                t.id,
                {
                    "template_id": t.id,
                    "slug": t.slug,
                    "version": t.version,
                    "app_id": app.id,
                    "deployment_id": deployment.id if deployment else None,
                    "managed_database_id": database.row.id if database else None,
                },
                tenant_id=app.tenant_id,
                account_id=tenant.account_id,
            )
        return Instantiated(app, deployment, database)
