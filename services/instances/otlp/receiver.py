"""The OTLP receiver's two transports: OTLP/gRPC (TraceService, MetricsService) and OTLP/HTTP
(`POST /v1/traces`, `/v1/metrics`, protobuf or JSON, gzip allowed).

The gRPC methods take the request as raw bytes and parse it here, so a garbage payload is
INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL). Refusals follow the OTLP
specification: INVALID_ARGUMENT / 400 and UNAUTHENTICATED / 401 are final; RESOURCE_EXHAUSTED /
429 carries `google.rpc.RetryInfo` and `Retry-After`; an oversized export is refused before it
is read (gRPC's receive limit; the HTTP body is counted as it arrives, decompressed too).
Every error body is a `google.rpc.Status`. Logs are not taken here: instance logs are read from
the engine, so LogsService stays unimplemented.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import uvicorn
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.instances.otlp.decode import BadPayload, parse
from services.instances.otlp.ingest import METRICS, TRACES, Ingest, Refused, Signal

log = logging.getLogger("ctrlmesh.instances.otlp")

TOKEN_HEADER = "x-ctrlmesh-otlp-token"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500}
_SERVICES = {
    "opentelemetry.proto.collector.trace.v1.TraceService": TRACES,
    "opentelemetry.proto.collector.metrics.v1.MetricsService": METRICS,
}


def token_of(headers: Callable[[str], str | None]) -> str | None:
    direct = headers(TOKEN_HEADER)
    if direct:
        return direct.strip()
    auth = headers("authorization") or ""
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def status_of(err: Refused) -> status_pb2.Status:
    st = status_pb2.Status(code=getattr(code_pb2, err.code), message=err.message)
    if err.retry_after is not None:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(err.retry_after)))
        )
        st.details.append(info)
    return st


async def handle(ingest: Ingest, signal: Signal, token: str | None, body: bytes, *, json_body: bool) -> Any:
    """The response message of one export; Refused when it is not taken."""
    owner = await ingest.owner(token)
    try:
        req = parse(body, signal.request, json_body=json_body)
    except BadPayload as err:
        raise Refused("INVALID_ARGUMENT", str(err)) from err
    try:
        return await ingest.export(signal, owner, req)
    except Exception as err:
        log.exception("OTLP %s export of %s failed", signal.name, owner.instance_id)
        raise Refused("INTERNAL", "the export could not be stored") from err


# -- gRPC ----------------------------------------------------------------------------------------


def grpc_handler(ingest: Ingest) -> grpc.GenericRpcHandler:
    def method(signal: Signal) -> grpc.RpcMethodHandler:
        async def export(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            md = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            try:
                return await handle(ingest, signal, token_of(md.get), body, json_body=False)
            except Refused as err:
                await context.abort_with_status(rpc_status.to_status(status_of(err)))

        return grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None, response_serializer=lambda m: m.SerializeToString()
        )

    handlers = {
        service: grpc.method_handlers_generic_handler(service, {"Export": method(signal)})
        for service, signal in _SERVICES.items()
    }

    class Dispatch(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            service = details.method.lstrip("/").split("/", 1)[0]  # type: ignore[attr-defined]  # grpc's stub lacks `method`
            h = handlers.get(service)
            return h.service(details) if h is not None else None

    return Dispatch()


# -- HTTP ----------------------------------------------------------------------------------------


class TooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge()
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as err:
            raise BadPayload("the gzip body is corrupt") from err
        if len(body) > limit or d.unconsumed_tail:
            raise TooLarge()
    return body


def http_app(ingest: Ingest, max_bytes: int) -> Starlette:
    def answer(msg: Any, status: int, json_body: bool, headers: dict[str, str] | None = None) -> Response:
        if json_body:
            return Response(json_format.MessageToJson(msg, indent=None), status, headers, media_type=JSON)
        return Response(msg.SerializeToString(), status, headers, media_type=PROTOBUF)

    def endpoint(signal: Signal) -> Callable[[Request], Awaitable[Response]]:
        async def export(request: Request) -> Response:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in (PROTOBUF, JSON):
                st = status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message=f"content type must be {PROTOBUF} or {JSON}"
                )
                return answer(st, 415, False)
            json_body = ctype == JSON
            try:
                try:
                    body = await read_body(request, max_bytes)
                except BadPayload as err:
                    raise Refused("INVALID_ARGUMENT", str(err)) from err
                except TooLarge:
                    st = status_pb2.Status(
                        code=code_pb2.RESOURCE_EXHAUSTED,
                        message=f"the export is larger than {max_bytes} bytes",
                    )
                    return answer(st, 413, json_body)
                msg = await handle(ingest, signal, token_of(request.headers.get), body, json_body=json_body)
            except Refused as err:
                headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after is not None else None
                return answer(status_of(err), _HTTP.get(err.code, 500), json_body, headers)
            return answer(msg, 200, json_body)

        return export

    return Starlette(
        routes=[
            Route("/v1/traces", endpoint(TRACES), methods=["POST"]),
            Route("/v1/metrics", endpoint(METRICS), methods=["POST"]),
        ]
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the service process owns SIGTERM (libs/grpc_server)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    # SO_REUSEPORT: several instances-service processes share the receiver's ports.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Receiver:
    def __init__(self, ingest: Ingest, *, host: str, grpc_port: int, http_port: int, max_bytes: int):
        self.ingest = ingest
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.max_bytes = max_bytes

    async def run(self) -> None:
        """Serve both transports until cancelled, then stop them gracefully."""
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", self.max_bytes),
            ]
        )
        server.add_generic_rpc_handlers((grpc_handler(self.ingest),))
        try:
            self.grpc_port = server.add_insecure_port(f"{self.host}:{self.grpc_port}")
            sock = _listen(self.host, self.http_port)
        except (OSError, RuntimeError):
            # The service keeps serving its API; instances' exports fail until it is restarted.
            log.error(
                "the OTLP receiver cannot listen on %s (gRPC %d, HTTP %d)",
                self.host,
                self.grpc_port,
                self.http_port,
                exc_info=True,
            )
            raise
        await server.start()
        config = uvicorn.Config(
            http_app(self.ingest, self.max_bytes), log_level="warning", lifespan="off", access_log=False
        )
        http = _Server(config)
        self.http_port = sock.getsockname()[1]
        task = asyncio.create_task(http.serve(sockets=[sock]), name="otlp-http")
        log.info("OTLP receiver on %s (gRPC %d, HTTP %d)", self.host, self.grpc_port, self.http_port)
        try:
            await asyncio.Event().wait()
        finally:
            http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            await server.stop(2)
            sock.close()
