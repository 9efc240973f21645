"""The HTTP/JSON edge: a generic transcoder from the `google.api.http` rules to gRPC calls.

No handler is written for a gRPC method. One ASGI endpoint matches the route table built from
the descriptors, authenticates, transcodes, calls, and maps the answer or the error back.
Server-streaming RPCs are served as Server-Sent Events. `/health`, `/openapi.json` and
`/metrics` are the edge's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from gateway import errors
from gateway.auth import INVALIDATE_KEY, Authenticator
from gateway.openapi import build_openapi
from gateway.routes import Route, Router, load_routes
from gateway.transcode import build_request, to_json
from libs.clients import Channels, Signer
from libs.errors import CtrlmeshError, Unauthenticated
from libs.settings import SERVICES, Settings
from libs.telemetry import ATTR_PRINCIPAL, ATTR_ROUTE, ATTR_TENANT, scrub_server_span

log = logging.getLogger("ctrlmesh.edge")

HTTP_COUNT = Counter("ctrlmesh_http_requests_total", "HTTP requests", ["route", "status"])
HTTP_LATENCY = Histogram("ctrlmesh_http_request_seconds", "HTTP latency", ["route"])

DEFAULT_TIMEOUT = 30.0
SSE_KEEPALIVE = 15.0


def _grpc_timeout(value: str | None) -> float:
    """`Grpc-Timeout: 5S` / `200m` / `100u` → seconds (grpc-gateway honours it the same way)."""
    if not value:
        return DEFAULT_TIMEOUT
    units = {"H": 3600, "M": 60, "S": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    try:
        return max(0.001, int(value[:-1]) * units[value[-1]])
    except (KeyError, ValueError):
        return DEFAULT_TIMEOUT


class Edge:
    def __init__(self, settings: Settings, channels: Channels, signer: Signer):
        self.settings = settings
        self.channels = channels
        self.signer = signer
        self.router = Router(load_routes())
        self.auth = Authenticator(channels, signer, settings.auth_cache_ttl.total_seconds())
        self.openapi = build_openapi(self.router.routes, settings.version)

    # -- plumbing ---------------------------------------------------------------------------

    def _callable(self, route: Route) -> Any:
        ch = self.channels.get(route.service)
        req_cls, resp_cls = route.request_class(), route.response_class()
        if route.streaming:
            return ch.unary_stream(
                route.grpc_path,
                request_serializer=req_cls.SerializeToString,
                response_deserializer=resp_cls.FromString,
            )
        return ch.unary_unary(
            route.grpc_path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )

    def _honour_trailers(self, trailers: Any) -> None:
        for key, value in trailers or ():
            if key == INVALIDATE_KEY:
                self.auth.invalidate_key(str(value))

    async def _principal(self, request: Request, route: Route) -> Any:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token and route.streaming:
            token = request.query_params.get("token", "")
        if not token:
            raise Unauthenticated("missing bearer API key (Authorization: Bearer <api-key>)")
        return await self.auth.authenticate(token)

    # -- the one endpoint -------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        route, params, path_exists = self.router.match(request.method, request.url.path)
        if route is None:
            status, reason = (405, "MethodNotAllowed") if path_exists else (404, "NotFound")
            msg = "method not allowed on this path" if path_exists else "no such route"
            return JSONResponse(errors.body(reason, msg), status_code=status)
        label = f"{route.http_method} {route.template}"
        span = trace.get_current_span()
        span.set_attribute(ATTR_ROUTE, label)
        with HTTP_LATENCY.labels(label).time():
            try:
                response = await self._handle(request, route, params)
            except Exception:
                trace_id = format(span.get_span_context().trace_id, "032x")
                log.exception("edge failure on %s (trace %s)", label, trace_id)
                response = JSONResponse(
                    errors.body("Internal", f"internal error (trace {trace_id})"), status_code=500
                )
        HTTP_COUNT.labels(label, str(response.status_code)).inc()
        return response

    async def _handle(self, request: Request, route: Route, params: dict[str, str]) -> Response:
        try:
            principal = await self._principal(request, route)
            trace.get_current_span().set_attribute(ATTR_PRINCIPAL, principal.key_id)
            if principal.tenant_id:
                trace.get_current_span().set_attribute(ATTR_TENANT, principal.tenant_id)
            body: Any = None
            if route.body:
                raw = await request.body()
                if raw.strip():
                    try:
                        body = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        return JSONResponse(
                            errors.body(
                                "BadRequest",
                                f"malformed JSON body: {err}",
                                {"fields": {"body": "malformed JSON"}},
                            ),
                            status_code=400,
                        )
                elif route.body == "*":
                    body = {}
            msg = build_request(
                route.request_class(),
                body_field=route.body,
                body=body,
                path_params=params,
                query=list(request.query_params.multi_items()),
            )
            if (
                route.streaming
                and "last_event_id" in route.input.fields_by_name
                and request.headers.get("last-event-id")
            ):
                msg.last_event_id = request.headers["last-event-id"]  # type: ignore[attr-defined]
        except CtrlmeshError as err:
            status, payload = errors.from_ctrlmesh(err)
            return JSONResponse(payload, status_code=status)
        except grpc.aio.AioRpcError as err:
            status, payload = errors.from_rpc_error(err, "accounts")
            return JSONResponse(payload, status_code=status)
        metadata = self.signer.metadata(principal)
        timeout = _grpc_timeout(request.headers.get("grpc-timeout"))
        if route.streaming:
            return await self._stream(route, msg, metadata, request)
        try:
            call = self._callable(route)(msg, metadata=metadata, timeout=timeout)
            answer = await call
            self._honour_trailers(await call.trailing_metadata())
        except grpc.aio.AioRpcError as err:
            status, payload = errors.from_rpc_error(err, route.service)
            return JSONResponse(payload, status_code=status)
        if answer.ListFields() == [] and route.empty_status:
            return Response(status_code=route.empty_status)
        if route.status == 204:
            return Response(status_code=204)
        return JSONResponse(to_json(answer, route.response_body), status_code=route.status)

    async def _stream(self, route: Route, msg: Any, metadata: Any, request: Request) -> Response:
        call = self._callable(route)(msg, metadata=metadata)
        try:
            await call.initial_metadata()
            if call.done():
                await call.code()
                _ = [m async for m in call]
        except grpc.aio.AioRpcError as err:
            status, payload = errors.from_rpc_error(err, route.service)
            return JSONResponse(payload, status_code=status)

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 3000\n\n"
            it = call.__aiter__()
            pending: asyncio.Task[Any] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(it.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE)
                    if not done:
                        yield b": ping\n\n"
                        continue
                    try:
                        item = pending.result()
                    except StopAsyncIteration:
                        return
                    pending = None
                    data = to_json(item)
                    lines = []
                    if isinstance(data, dict) and data.get("id"):
                        lines.append(f"id: {data['id']}")
                    lines.append(
                        f"event: {data.get('type') or route.method.name if isinstance(data, dict) else route.method.name}"
                    )
                    lines.append("data: " + json.dumps(data, separators=(",", ":")))
                    yield ("\n".join(lines) + "\n\n").encode()
            except grpc.aio.AioRpcError as err:
                _, payload = errors.from_rpc_error(err, route.service)
                yield ("event: error\ndata: " + json.dumps(payload) + "\n\n").encode()
            finally:
                if pending is not None:
                    pending.cancel()
                call.cancel()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- the edge's own routes --------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        async def check(name: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self.channels.get(name))
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return (
                    name,
                    "SERVING" if r.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING",
                )
            except grpc.aio.AioRpcError as err:
                return name, err.code().name

        results = dict(await asyncio.gather(*(check(s) for s in SERVICES)))
        failing = {k: v for k, v in results.items() if v != "SERVING"}
        if not failing:
            return JSONResponse({"status": "healthy", "version": self.settings.version})
        return JSONResponse(
            {"status": "degraded", "version": self.settings.version, "failing": failing}, status_code=503
        )

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, channels: Channels, signer: Signer) -> Any:
    edge = Edge(settings, channels, signer)
    app = Starlette(
        routes=[
            StarletteRoute("/health", edge.health, methods=["GET"]),
            StarletteRoute("/openapi.json", edge.openapi_json, methods=["GET"]),
            StarletteRoute("/metrics", edge.metrics, methods=["GET"]),
            StarletteRoute("/{path:path}", edge.dispatch, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
    )
    app.state.edge = edge
    return OpenTelemetryMiddleware(app, server_request_hook=scrub_server_span)
