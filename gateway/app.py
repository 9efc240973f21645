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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import request_response

from gateway import errors
from gateway.auth import INVALIDATE_KEY, Authenticator
from gateway.openapi import build_openapi
from gateway.refusals import Refusals
from gateway.routes import PUBLIC_ROUTES, Route, Router, load_routes
from gateway.transcode import build_request, to_json
from libs.clients import Channels, Signer
from libs.errors import (
    CtrlmeshError,
    DeadlineExceeded,
    InvalidArgument,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)
from libs.grpc_server import STREAM_OPEN_KEY
from libs.settings import SERVICES, Settings
from libs.supervision import read_status
from libs.telemetry import ATTR_PRINCIPAL, ATTR_ROUTE, ATTR_TENANT, AsgiTracing, name_server_span

log = logging.getLogger("ctrlmesh.edge")

HTTP_COUNT = Counter("ctrlmesh_http_requests_total", "HTTP requests", ["route", "status"])
HTTP_LATENCY = Histogram("ctrlmesh_http_request_seconds", "HTTP latency", ["route"])

SSE_KEEPALIVE = 15.0
# Deeper JSON than any of our messages needs; the parser's own limit (about 1,000) is an error.
MAX_JSON_DEPTH = 64


def _grpc_timeout(value: str | None, default: float) -> float:
    """`Grpc-Timeout: 5S` / `200m` / `100u` → seconds (grpc-gateway honours it the same way)."""
    if not value:
        return default
    units = {"H": 3600, "M": 60, "S": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    try:
        return max(0.001, int(value[:-1]) * units[value[-1]])
    except (KeyError, ValueError):
        return default


def _bad_body(message: str, what: str) -> InvalidArgument:
    return InvalidArgument(message, fields={"body": what})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `max_depth` and strings that are not valid UTF-8 (lone
    surrogates from `\\ud800` escapes), naming the field. Iterative: depth costs no recursion."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict | list):
            if depth >= max_depth:
                raise _bad_body(f"JSON nested deeper than {max_depth} levels", "nested too deep")
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in pairs:
                if isinstance(k, str):
                    _check_text(k, path or "body")
                child = f"{path}.{k}" if path and isinstance(k, str) else (k if isinstance(k, str) else path)
                stack.append((v, depth + 1, child or "body"))
        elif isinstance(node, str):
            _check_text(node, path or "body")


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{field!r} is not valid UTF-8 (an unpaired surrogate)", fields={field: "not valid UTF-8"}
        ) from None


def _strict_path_params(route: Route, raw_path: bytes, params: dict[str, str]) -> dict[str, str]:
    """Path variables decoded from the raw path as strict UTF-8: the server's own decoding turns
    invalid bytes into U+FFFD, which would be looked up as if the client had sent it."""
    m = route.regex.match(raw_path.decode("latin-1"))
    if m is None:
        return params
    out = dict(params)
    for group, raw in m.groupdict().items():
        name = group.replace("__", ".")
        try:
            out[name] = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"path parameter {name!r} is not valid UTF-8", fields={name: "not valid UTF-8"}
            ) from None
    return out


def _strict_query(raw: bytes) -> list[tuple[str, str]]:
    """The query string as (name, value) pairs, percent-decoded as strict UTF-8."""
    items: list[tuple[str, str]] = []
    for part in raw.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        try:
            name = unquote_to_bytes(k.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                "a query parameter name is not valid UTF-8", fields={"query": "not valid UTF-8"}
            ) from None
        try:
            value = unquote_to_bytes(v.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"query parameter {name!r} is not valid UTF-8", fields={name: "not valid UTF-8"}
            ) from None
        items.append((name, value))
    return items


class Edge:
    def __init__(self, settings: Settings, channels: Channels, signer: Signer):
        self.settings = settings
        self.channels = channels
        self.signer = signer
        self.router = Router(load_routes())
        self.auth = Authenticator(channels, signer, settings.auth_cache_ttl.total_seconds())
        self.openapi = build_openapi(self.router.routes, settings.version)
        self.refusals = Refusals(channels, signer)
        # The edge's own handlers by (method, path), set by create_app.
        self.own: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {}
        self._own_methods: dict[str, list[str]] = {}
        for m, p in PUBLIC_ROUTES:
            self._own_methods.setdefault(p, []).append(m)
        for methods in self._own_methods.values():
            methods.sort()
        # The callable of each route, made once per channel (grpc_path → (channel, callable)).
        self._callables: dict[str, tuple[Any, Any]] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _callable(self, route: Route) -> Any:
        ch = self.channels.get(route.service)
        made = self._callables.get(route.grpc_path)
        if made is not None and made[0] is ch:
            return made[1]
        req_cls, resp_cls = route.request_class(), route.response_class()
        make = ch.unary_stream if route.streaming else ch.unary_unary
        fn = make(
            route.grpc_path,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        self._callables[route.grpc_path] = (ch, fn)
        return fn

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
        path = request.url.path
        handler = self.own.get((request.method, path))
        if handler is not None:
            return await handler(request)
        own = self._own_methods.get(path)
        route, params, allowed = self.router.match(request.method, path)
        if own:
            allowed = own
        if route is None:
            if allowed:
                return JSONResponse(
                    errors.body("MethodNotAllowed", f"{request.method} is not served on this path"),
                    status_code=405,
                    headers={"Allow": ", ".join(allowed)},
                )
            return JSONResponse(errors.body("NotFound", "no such route"), status_code=404)
        label = route.label
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(ATTR_ROUTE, label)
            name_server_span(label)
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

    async def _read_body(self, request: Request) -> bytes:
        """The body, read as it arrives and refused as soon as it passes the limit."""
        limit = self.settings.max_body_bytes
        too_large = PayloadTooLarge(f"the request body exceeds {limit} bytes", details={"limit_bytes": limit})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request, route: Route) -> Any:
        content_type = request.headers.get("content-type", "")
        has_body = request.headers.get("content-length", "") not in ("", "0") or (
            "transfer-encoding" in request.headers
        )
        # A body without Content-Type is read as JSON; under any other type it is refused.
        if has_body and content_type and not _is_json(content_type):
            raise UnsupportedMediaType(
                f"request bodies are JSON; {content_type.split(';', 1)[0]!r} is not accepted",
                details={"content_type": content_type[:100]},
            )
        raw = await self._read_body(request)
        if not raw.strip():
            return {} if route.body == "*" else None
        try:
            body = json.loads(raw)
        except RecursionError:
            raise _bad_body(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "nested too deep") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _bad_body(f"malformed JSON body: {err}", "malformed JSON") from None
        check_json(body)
        return body

    def _deadline(self, request: Request) -> float:
        default = self.settings.read_deadline if request.method == "GET" else self.settings.write_deadline
        return _grpc_timeout(request.headers.get("grpc-timeout"), default.total_seconds())

    async def _handle(self, request: Request, route: Route, params: dict[str, str]) -> Response:
        principal = None
        try:
            principal = await self._principal(request, route)
            trace.get_current_span().set_attribute(ATTR_PRINCIPAL, principal.key_id)
            if principal.tenant_id:
                trace.get_current_span().set_attribute(ATTR_TENANT, principal.tenant_id)
            body = await self._body(request, route) if route.body else None
            raw_path = request.scope.get("raw_path")
            if raw_path:
                params = _strict_path_params(route, raw_path, params)
            msg = build_request(
                route.request_class(),
                body_field=route.body,
                body=body,
                path_params=params,
                query=_strict_query(request.scope.get("query_string", b"")),
            )
            if (
                route.streaming
                and "last_event_id" in route.input.fields_by_name
                and request.headers.get("last-event-id")
            ):
                setattr(msg, "last_event_id", request.headers["last-event-id"])  # noqa: B010  # the message type is only known from the descriptor
        except CtrlmeshError as err:
            # Refused before the RPC: the audit entry the service would have written.
            await self.refusals.record(route, principal, params, err)
            status, payload = errors.from_ctrlmesh(err)
            return JSONResponse(payload, status_code=status)
        except grpc.aio.AioRpcError as err:
            status, payload = errors.from_rpc_error(err, "accounts")
            return JSONResponse(payload, status_code=status)
        metadata = self.signer.metadata(principal)
        timeout = self._deadline(request)
        if route.streaming:
            return await self._stream(route, msg, metadata, timeout)
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

    async def _open(self, call: Any) -> tuple[bool, Any]:
        """Wait until the stream is known to be open: the service's open mark in the initial
        metadata, else the first message or the end of the call. (done, first message or None).

        A service that refuses the call (a missing or foreign resource) ends it without the mark,
        so its error is raised here, before any SSE byte."""
        md = await call.initial_metadata()
        if any(k == STREAM_OPEN_KEY for k, _ in md or ()):
            return False, None
        try:
            return False, await call.__aiter__().__anext__()
        except StopAsyncIteration:
            return True, None

    async def _stream(self, route: Route, msg: Any, metadata: Any, open_within: float) -> Response:
        # No deadline on the stream itself (it may follow for hours): only on its opening.
        call = self._callable(route)(msg, metadata=metadata)
        try:
            done, first = await asyncio.wait_for(self._open(call), open_within)
        except grpc.aio.AioRpcError as err:
            status, payload = errors.from_rpc_error(err, route.service)
            return JSONResponse(payload, status_code=status)
        except TimeoutError:
            call.cancel()
            status, payload = errors.from_ctrlmesh(
                DeadlineExceeded(
                    f"the {route.service} service did not open the stream in time",
                    details={"service": route.service},
                )
            )
            return JSONResponse(payload, status_code=status)

        def frame(item: Any) -> bytes:
            data = to_json(item)
            lines = []
            if isinstance(data, dict) and data.get("id"):
                lines.append(f"id: {data['id']}")
            name = (data.get("type") if isinstance(data, dict) else None) or route.method.name
            lines.append(f"event: {name}")
            lines.append("data: " + json.dumps(data, separators=(",", ":")))
            return ("\n".join(lines) + "\n\n").encode()

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 3000\n\n"
            if first is not None:
                yield frame(first)
            if done:
                return
            it = call.__aiter__()
            pending: asyncio.Task[Any] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(it.__anext__())
                    finished, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE)
                    if not finished:
                        yield b": ping\n\n"
                        continue
                    try:
                        item = pending.result()
                    except StopAsyncIteration:
                        return
                    pending = None
                    yield frame(item)
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
        limit = self.settings.health_timeout.total_seconds()

        async def check(name: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self.channels.get(name))
            try:
                # The outer bound holds even if connecting itself hangs on a frozen peer.
                r = await asyncio.wait_for(
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=limit), limit + 0.5
                )
                return (
                    name,
                    "SERVING" if r.status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING",
                )
            except grpc.aio.AioRpcError as err:
                return name, err.code().name
            except TimeoutError:
                return name, grpc.StatusCode.DEADLINE_EXCEEDED.name

        results = dict(await asyncio.gather(*(check(s) for s in SERVICES)))
        # The launcher's view: the processes not probed here (the PG Gateway, Caddy), and for a
        # service that does not answer, whether it is being restarted or was given up on.
        for name, state in read_status(self.settings.data_dir).items():
            if name != "edge" and results.get(name) != "SERVING":
                results[name] = state.upper()
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
    own = {"/health": edge.health, "/openapi.json": edge.openapi_json, "/metrics": edge.metrics}
    assert {p for _, p in PUBLIC_ROUTES} == set(own), "PUBLIC_ROUTES names the edge's own routes"
    edge.own = {(m, p): own[p] for m, p in PUBLIC_ROUTES}
    app = Starlette()
    # Every request reaches dispatch, whatever the verb or the bytes of the path (Starlette's
    # `{path:path}` stops at a newline): a JSON 404 or 405 with `Allow`, never plain text.
    app.router.default = request_response(edge.dispatch)
    app.state.edge = edge
    return AsgiTracing(app)
