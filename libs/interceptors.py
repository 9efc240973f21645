"""What wraps every ctrlmesh RPC: one stage per concern, in the documented order.

      Tracing     the server span, current while the call runs (recorded only while its trace is
                  sampled: libs/telemetry.py)
      → Metrics     every call counted with its final code and timed, refused ones included
                    (and a unary call's SQL round trips and peer calls tallied: libs/budget.py)
      → Context     the method name for logs and the audit
      → Auth        the signed principal verified (refusal: UNAUTHENTICATED) and made current
      → Errors      domain errors become google.rpc.Status with ErrorInfo; anything unexpected is
                    INTERNAL with a fixed message and the trace id (the cause goes to the log)
      → Audit       the outcome recorded for methods with an audit rule, refusals included
      → Validation  protovalidate rules and NUL characters, 400 naming the fields
      → the servicer method

Each stage sees a `Call` and the next step, for unary calls (`unary`) and server streams
(`stream`) alike, so a stream gets the same errors, counting and catch-all as a unary call.
Health and reflection are outside the chain.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import protovalidate
from ctrlmesh.common.v1 import common_pb2
from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from libs import budget, telemetry
from libs import principal as principals
from libs.errors import ERROR_DOMAIN, STATUS_DETAILS_KEY, CtrlmeshError, InvalidArgument

log = logging.getLogger("ctrlmesh.grpc")

RPC_COUNT = Counter("ctrlmesh_grpc_server_requests_total", "RPCs served", ["service", "method", "code"])
RPC_LATENCY = Histogram("ctrlmesh_grpc_server_latency_seconds", "RPC latency", ["service", "method"])

# Methods outside our contracts (health, reflection) are neither authenticated nor audited.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

current_method: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")

AuditSink = Callable[[dict[str, Any]], Awaitable[None]]

# Initial metadata a streaming method sends once its resource is resolved (`open_stream`): the
# edge starts its SSE answer only then, so a refused stream is a plain HTTP error instead.
STREAM_OPEN_KEY = "x-ctrlmesh-stream-open"

_NUL_TEXT = "must not contain a NUL character"


async def open_stream(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Tell the caller the stream is accepted, before its first message (which may be hours
    away). Call it after the resource is resolved and the caller's access to it checked; a
    stream that never calls it is taken as open at its first message."""
    await context.send_initial_metadata(((STREAM_OPEN_KEY, "1"),))


# -- what a stage sees ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    service: str
    name: str
    audit: common_pb2.AuditRule | None


def method_info(full_method: str) -> MethodInfo:
    """`/pkg.Service/Method` → its service and method names and audit rule (descriptor options)."""
    _, service, name = full_method.split("/")
    audit = None
    try:
        opts = descriptor_pool.Default().FindMethodByName(f"{service}.{name}").GetOptions()
        if opts.HasExtension(common_pb2.audit):
            audit = opts.Extensions[common_pb2.audit]
    except KeyError:
        pass
    return MethodInfo(service, name, audit)


@dataclass
class Call:
    method: str
    info: MethodInfo
    request: Message
    context: grpc.aio.ServicerContext[Any, Any]
    metadata: Sequence[tuple[str, str | bytes]]
    principal: principals.Principal | None = None
    # The final gRPC code name, set by the Errors stage (and by Auth for a refusal).
    code: str = "OK"
    extra: dict[str, Any] = field(default_factory=dict)


Unary = Callable[[Call], Awaitable[Message]]
Stream = Callable[[Call], AsyncIterator[Message]]


class Stage:
    """A concern around every call; the default passes through."""

    async def unary(self, call: Call, nxt: Unary) -> Message:
        return await nxt(call)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        async for item in nxt(call):
            yield item


def status_details(err: CtrlmeshError) -> bytes:
    """google.rpc.Status with ErrorInfo (+ BadRequest for field violations), serialized."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    for k, v in err.details.items():
        if k != "fields":
            info.metadata[k] = str(v)
    details: list[Message] = [info]
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


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: CtrlmeshError) -> None:
    await context.abort(err.code, err.message, trailing_metadata=((STATUS_DETAILS_KEY, status_details(err)),))


def _trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


# -- the stages ----------------------------------------------------------------------------------


class Tracing(Stage):
    async def unary(self, call: Call, nxt: Unary) -> Message:
        with telemetry.rpc_server_span(call.method, call.metadata) as span:
            try:
                return await nxt(call)
            finally:
                telemetry.finish_rpc_span(span, call.code)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        with telemetry.rpc_server_span(call.method, call.metadata) as span:
            try:
                async for item in nxt(call):
                    yield item
            finally:
                telemetry.finish_rpc_span(span, call.code)


class Metrics(Stage):
    async def unary(self, call: Call, nxt: Unary) -> Message:
        started = time.perf_counter()
        try:
            with budget.tally(call.info.service, call.info.name):
                return await nxt(call)
        finally:
            self._observe(call, started)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        started = time.perf_counter()
        try:
            async for item in nxt(call):
                yield item
        finally:
            self._observe(call, started)

    @staticmethod
    def _observe(call: Call, started: float) -> None:
        RPC_COUNT.labels(call.info.service, call.info.name, call.code).inc()
        RPC_LATENCY.labels(call.info.service, call.info.name).observe(time.perf_counter() - started)


class Context(Stage):
    async def unary(self, call: Call, nxt: Unary) -> Message:
        token = current_method.set(call.method)
        try:
            return await nxt(call)
        finally:
            current_method.reset(token)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        token = current_method.set(call.method)
        try:
            async for item in nxt(call):
                yield item
        finally:
            current_method.reset(token)


class Auth(Stage):
    def __init__(self, secret: bytes):
        self._secret = secret

    async def _verify(self, call: Call) -> None:
        try:
            call.principal = principals.verify(call.metadata, self._secret)
        except CtrlmeshError as err:
            call.code = err.code.name
            await abort(call.context, err)

    async def unary(self, call: Call, nxt: Unary) -> Message:
        await self._verify(call)
        assert call.principal is not None
        token = principals.set_current(call.principal)
        try:
            return await nxt(call)
        finally:
            principals.reset_current(token)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        await self._verify(call)
        assert call.principal is not None
        token = principals.set_current(call.principal)
        try:
            async for item in nxt(call):
                yield item
        finally:
            principals.reset_current(token)


class Errors(Stage):
    """The one place an exception becomes a gRPC status."""

    async def unary(self, call: Call, nxt: Unary) -> Message:
        try:
            return await nxt(call)
        except Exception as exc:
            await self._fail(call, exc)
            raise AssertionError("unreachable: abort raises") from None

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        try:
            async for item in nxt(call):
                yield item
        except Exception as exc:
            await self._fail(call, exc)

    @staticmethod
    async def _fail(call: Call, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            code = call.context.code()
            call.code = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise exc
        if isinstance(exc, CtrlmeshError):
            err = exc
        elif isinstance(exc, NotImplementedError):
            err = CtrlmeshError(f"{call.method} is not implemented yet", reason="NotImplemented")
        else:
            trace_id = _trace_id()
            log.error("unexpected error in %s (trace %s)", call.method, trace_id, exc_info=exc)
            err = CtrlmeshError(f"internal error (trace {trace_id})")
        call.code = err.code.name
        await abort(call.context, err)


class Audit(Stage):
    """Who did what to which resource, with the outcome, for methods with an audit rule."""

    def __init__(self, service_name: str, sink: AuditSink | None):
        self._service = service_name
        self._sink = sink

    async def unary(self, call: Call, nxt: Unary) -> Message:
        if call.info.audit is None or self._sink is None:
            return await nxt(call)
        try:
            response = await nxt(call)
        except CtrlmeshError as err:
            await self._record(call, None, "failure", err.reason)
            raise
        except NotImplementedError:
            await self._record(call, None, "failure", "NotImplemented")
            raise
        except grpc.aio.AbortError:
            code = call.context.code()
            await self._record(call, None, "failure", code.name if isinstance(code, grpc.StatusCode) else "")
            raise
        except Exception:
            await self._record(call, None, "failure", "Internal")
            raise
        await self._record(call, response, "success", "")
        return response

    async def _record(self, call: Call, response: Message | None, outcome: str, reason: str) -> None:
        assert call.info.audit is not None and self._sink is not None and call.principal is not None
        rule, p, request = call.info.audit, call.principal, call.request
        # The named request field wins: some responses carry an id of another resource.
        resource_id = (
            (str(getattr(request, rule.id_field, "")) if rule.id_field else "")
            or _find_field(response, "id")
            or _find_field(request, "id")
        )
        tenant_id = p.tenant_id or _find_field(response, "tenant_id") or _find_field(request, "tenant_id")
        if not tenant_id and rule.resource == "tenant" and resource_id.startswith("ten_"):
            tenant_id = resource_id
        span = trace.get_current_span().get_span_context()
        entry: dict[str, Any] = {
            "tenant_id": tenant_id,
            "actor_id": p.key_id,
            "actor_type": "system" if principals.is_system(p) else "api_key",
            "resource": rule.resource,
            "resource_id": resource_id,
            "action": rule.action,
            "outcome": outcome,
            "reason": reason,
            "service": self._service,
            "method": f"{call.info.service}/{call.info.name}",
            "trace_id": format(span.trace_id, "032x") if span.trace_id else "",
        }
        # The request may carry what PostgreSQL cannot store (a NUL the validation step refused):
        # the entry keeps a visible stand-in rather than being lost.
        entry = {k: v.replace("\x00", "\\0") if isinstance(v, str) else v for k, v in entry.items()}
        try:
            await self._sink(entry)
        except Exception:
            log.exception("could not record audit entry %s", entry)


class Validation(Stage):
    async def unary(self, call: Call, nxt: Unary) -> Message:
        self._check(call.request)
        return await nxt(call)

    async def stream(self, call: Call, nxt: Stream) -> AsyncIterator[Message]:
        self._check(call.request)
        async for item in nxt(call):
            yield item

    @staticmethod
    def _check(request: Message) -> None:
        fields = violations(request)
        if fields:
            summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
            raise InvalidArgument(f"invalid request: {summary}", fields=fields)


def violations(request: Message) -> dict[str, str]:
    fields = _nul_violations(request)
    if fields:
        # Rules such as patterns would only add noise about the same bad value.
        return fields
    for v in protovalidate.collect_violations(request):
        proto = v.proto
        elements = proto.field.elements if proto.field is not None else []
        path = ".".join(e.field_name for e in elements)
        fields[path or proto.rule_id or "request"] = proto.message
    return fields


def _nul_violations(msg: Message, prefix: str = "") -> dict[str, str]:
    """Every string field (nested, repeated, map keys and values) holding a NUL character.

    PostgreSQL text cannot store NUL, so such a value would fail deep inside a service as an
    internal error; refusing it here gives every route the same 400 naming the field.
    """
    found: dict[str, str] = {}
    for f, value in msg.ListFields():
        name = f"{prefix}{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                if isinstance(k, str) and "\x00" in k:
                    found[f"{name}[{k!r}]"] = _NUL_TEXT
                if isinstance(v, str) and "\x00" in v:
                    found[f"{name}[{k!r}]"] = _NUL_TEXT
                elif vf.message_type is not None:
                    found.update(_nul_violations(v, f"{name}[{k!r}]."))
            continue
        items = value if f.is_repeated else [value]
        for i, item in enumerate(items):
            where = f"{name}[{i}]" if f.is_repeated else name
            if isinstance(item, str):
                if "\x00" in item:
                    found[where] = _NUL_TEXT
            elif isinstance(item, Message):
                found.update(_nul_violations(item, f"{where}."))
    return found


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


# -- the chain -----------------------------------------------------------------------------------


class Chain(grpc.aio.ServerInterceptor):
    """The stages above around every ctrlmesh RPC, in order."""

    def __init__(self, service_name: str, secret: bytes, audit_sink: AuditSink | None):
        self.stages: list[Stage] = [
            Tracing(),
            Metrics(),
            Context(),
            Auth(secret),
            Errors(),
            Audit(service_name, audit_sink),
            Validation(),
        ]
        self._infos: dict[str, MethodInfo] = {}
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _unary_chain(self, inner: Callable[[Message, Any], Awaitable[Message]]) -> Unary:
        async def servicer(call: Call) -> Message:
            return await inner(call.request, call.context)

        fn: Unary = servicer
        for stage in reversed(self.stages):
            fn = _bind_unary(stage, fn)
        return fn

    def _stream_chain(self, inner: Callable[[Message, Any], AsyncIterator[Message]]) -> Stream:
        async def servicer(call: Call) -> AsyncIterator[Message]:
            async for item in inner(call.request, call.context):
                yield item

        fn: Stream = servicer
        for stage in reversed(self.stages):
            fn = _bind_stream(stage, fn)
        return fn

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        # The wrapped handler of a method is made once: the registered handler does not change.
        made = self._handlers.get(method)
        if made is None or made[0] is not handler:
            made = self._handlers[method] = (handler, self._wrap(method, handler))
        return made[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        info = self._infos.get(method)
        if info is None:
            info = self._infos[method] = method_info(method)
        if handler.unary_unary:
            run = self._unary_chain(handler.unary_unary)

            async def unary(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
                return await run(Call(method, info, request, context, context.invocation_metadata() or ()))

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            run_stream = self._stream_chain(handler.unary_stream)

            async def stream(
                request: Message, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Message]:
                metadata = context.invocation_metadata() or ()
                async for item in run_stream(Call(method, info, request, context, metadata)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _bind_unary(stage: Stage, nxt: Unary) -> Unary:
    async def step(call: Call) -> Message:
        return await stage.unary(call, nxt)

    return step


def _bind_stream(stage: Stage, nxt: Stream) -> Stream:
    def step(call: Call) -> AsyncIterator[Message]:
        return stage.stream(call, nxt)

    return step
