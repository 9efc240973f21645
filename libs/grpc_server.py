"""How every ctrlmesh service boots and what wraps every RPC.

`serve()` is the only way a service starts: typed settings → dependencies built once by the
service's `build()` → `grpc.aio.server` with a fixed interceptor order (tracing → metrics →
context → auth → errors → audit → validation) → the standard health service and reflection →
graceful drain on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import protovalidate
from ctrlmesh.common.v1 import common_pb2
from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import Counter, Histogram

from libs import principal as principals
from libs.errors import ERROR_DOMAIN, CtrlmeshError, InvalidArgument
from libs.events import register_event_stream
from libs.outbox import Outbox

log = logging.getLogger("ctrlmesh.grpc")

RPC_COUNT = Counter("ctrlmesh_grpc_server_requests_total", "RPCs served", ["service", "method", "code"])
RPC_LATENCY = Histogram("ctrlmesh_grpc_server_latency_seconds", "RPC latency", ["service", "method"])

# Methods outside our contracts (health, reflection) are neither authenticated nor audited.
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

current_method: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")

AuditSink = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class MethodInfo:
    audit: common_pb2.AuditRule | None
    service: str
    name: str


def _method_info(full_method: str) -> MethodInfo:
    _, service, name = full_method.split("/")
    info = MethodInfo(audit=None, service=service, name=name)
    try:
        desc = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return info
    opts = desc.GetOptions()
    if opts.HasExtension(common_pb2.audit):
        info.audit = opts.Extensions[common_pb2.audit]
    return info


def status_details(err: CtrlmeshError) -> bytes:
    """google.rpc.Status with ErrorInfo (+ BadRequest for field violations), serialized."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    for k, v in err.details.items():
        if k != "fields":
            info.metadata[k] = str(v)
    details = [info]
    fields = err.details.get("fields") or {}
    if fields:
        br = error_details_pb2.BadRequest()
        for f, desc in fields.items():
            br.field_violations.add(field=f, description=desc)
        details.append(br)
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    st = status_pb2.Status(code=err.code.value[0], message=err.message, details=packed)
    return st.SerializeToString()


def _violations(request: Message) -> dict[str, str]:
    fields: dict[str, str] = {}
    for v in protovalidate.collect_violations(request):
        proto = v.proto
        elements = proto.field.elements if proto.field is not None else []
        path = ".".join(e.field_name for e in elements)
        fields[path or proto.rule_id or "request"] = proto.message
    return fields


class Pipeline(grpc.aio.ServerInterceptor):
    """context → auth → errors → audit → validation, around every ctrlmesh RPC."""

    def __init__(self, service_name: str, secret: bytes, audit_sink: AuditSink | None):
        self._service_name = service_name
        self._secret = secret
        self._audit_sink = audit_sink
        self._infos: dict[str, MethodInfo] = {}

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        info = self._infos.get(method)
        if info is None:
            info = self._infos[method] = _method_info(method)
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Message, context: grpc.aio.ServicerContext) -> Message:
                return await self._unary(inner, request, context, method, info, metadata)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
                async for item in self._stream(inner_stream, request, context, method, metadata):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    # -- stages ------------------------------------------------------------------------------

    async def _authenticate(self, metadata: Any, context: grpc.aio.ServicerContext) -> principals.Principal:
        try:
            return principals.verify(metadata, self._secret)
        except CtrlmeshError as err:
            await self._abort(context, err)
            raise  # unreachable: abort raises

    async def _abort(self, context: grpc.aio.ServicerContext, err: CtrlmeshError) -> None:
        await context.abort(
            err.code, err.message, trailing_metadata=(("grpc-status-details-bin", status_details(err)),)
        )

    async def _unary(self, inner, request, context, method, info: MethodInfo, metadata):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        code = "OK"
        m_token = current_method.set(method)
        p = await self._authenticate(metadata, context)
        p_token = principals.set_current(p)
        try:
            try:
                return await self._audited(inner, request, context, info, p)
            except grpc.aio.AbortError:
                raise
            except CtrlmeshError as err:
                code = err.code.name
                await self._abort(context, err)
            except NotImplementedError:
                code = "UNIMPLEMENTED"
                await self._abort(
                    context, CtrlmeshError(f"{method} is not implemented yet", reason="NotImplemented")
                )
            except Exception:
                code = "INTERNAL"
                trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
                log.exception("unexpected error in %s (trace %s)", method, trace_id)
                await self._abort(context, CtrlmeshError(f"internal error (trace {trace_id})"))
            raise AssertionError("unreachable")
        finally:
            principals.reset_current(p_token)
            current_method.reset(m_token)
            RPC_COUNT.labels(info.service, info.name, code).inc()
            RPC_LATENCY.labels(info.service, info.name).observe(time.perf_counter() - started)

    async def _audited(self, inner, request, context, info: MethodInfo, p: principals.Principal):  # type: ignore[no-untyped-def]
        if info.audit is None or self._audit_sink is None:
            return await self._validated(inner, request, context)
        try:
            response = await self._validated(inner, request, context)
        except CtrlmeshError as err:
            await self._record(info, p, request, None, "failure", err.reason)
            raise
        except NotImplementedError:
            await self._record(info, p, request, None, "failure", "NotImplemented")
            raise
        except grpc.aio.AbortError:
            await self._record(
                info, p, request, None, "failure", context.code().name if context.code() else ""
            )
            raise
        except Exception:
            await self._record(info, p, request, None, "failure", "Internal")
            raise
        await self._record(info, p, request, response, "success", "")
        return response

    async def _validated(self, inner, request, context):  # type: ignore[no-untyped-def]
        fields = _violations(request)
        if fields:
            summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
            raise InvalidArgument(f"invalid request: {summary}", fields=fields)
        return await inner(request, context)

    async def _stream(self, inner, request, context, method, metadata):  # type: ignore[no-untyped-def]
        m_token = current_method.set(method)
        p = await self._authenticate(metadata, context)
        p_token = principals.set_current(p)
        try:
            fields = _violations(request)
            if fields:
                summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
                raise InvalidArgument(f"invalid request: {summary}", fields=fields)
            # Headers now: the edge waits for them to tell a rejected stream from an idle one.
            await context.send_initial_metadata(())
            async for item in inner(request, context):
                yield item
        except CtrlmeshError as err:
            await self._abort(context, err)
        except NotImplementedError:
            await self._abort(
                context, CtrlmeshError(f"{method} is not implemented yet", reason="NotImplemented")
            )
        finally:
            principals.reset_current(p_token)
            current_method.reset(m_token)

    async def _record(self, info: MethodInfo, p, request, response, outcome: str, reason: str) -> None:  # type: ignore[no-untyped-def]
        assert info.audit is not None and self._audit_sink is not None
        rule = info.audit
        # The named request field wins: some responses carry an id of another resource.
        resource_id = (
            (str(getattr(request, rule.id_field, "")) if rule.id_field else "")
            or _find_id(response)
            or _find_id(request)
        )
        tenant_id = p.tenant_id or _find_field(response, "tenant_id") or _find_field(request, "tenant_id")
        if not tenant_id and rule.resource == "tenant" and resource_id.startswith("ten_"):
            tenant_id = resource_id
        span = trace.get_current_span().get_span_context()
        entry = {
            "tenant_id": tenant_id,
            "actor_id": p.key_id,
            "actor_type": "system" if principals.is_system(p) else "api_key",
            "resource": rule.resource,
            "resource_id": resource_id,
            "action": rule.action,
            "outcome": outcome,
            "reason": reason,
            "service": self._service_name,
            "method": f"{info.service}/{info.name}",
            "trace_id": format(span.trace_id, "032x") if span.trace_id else "",
        }
        try:
            await self._audit_sink(entry)
        except Exception:
            log.exception("could not record audit entry %s", entry)


def _find_field(msg: Message | None, name: str) -> str:
    if msg is None:
        return ""
    if name in msg.DESCRIPTOR.fields_by_name:
        value = getattr(msg, name)
        if isinstance(value, str) and value:
            return value
    for f in msg.DESCRIPTOR.fields:
        if f.message_type is not None and not f.is_repeated and msg.HasField(f.name):
            found = _find_field(getattr(msg, f.name), name)
            if found:
                return found
    return ""


def _find_id(msg: Message | None) -> str:
    return _find_field(msg, "id")


@dataclass
class Service:
    """What a service hands to `serve()`: its name, how to register, and lifecycle hooks."""

    name: str
    register: Callable[[grpc.aio.Server], list[str]]
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # The service's outbox, served as its EventStreamService (libs/events.py) when given.
    events: Outbox | None = None


async def serve(
    service: Service,
    *,
    host: str,
    port: int,
    secret: bytes,
    audit_sink: AuditSink | None,
    grace: float = 5.0,
) -> None:
    server = grpc.aio.server(
        interceptors=[aio_server_interceptor(), Pipeline(service.name, secret, audit_sink)],
        options=[("grpc.so_reuseport", 0)],
    )
    names = service.register(server)
    if service.events is not None:
        names.append(register_event_stream(server, service.events, service.name))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    server.add_insecure_port(f"{host}:{port}")
    if service.on_start:
        await service.on_start()
    await server.start()
    for n in ["", *names]:
        await health.set(n, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(fn(), name=f"{service.name}-bg") for fn in service.background]
    log.info("%s serving gRPC on %s:%d", service.name, host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s draining", service.name)
    for n in ["", *names]:
        await health.set(n, health_pb2.HealthCheckResponse.NOT_SERVING)
    for t in tasks:
        t.cancel()
    await server.stop(grace)
    if service.on_stop:
        await service.on_stop()
    log.info("%s stopped", service.name)
