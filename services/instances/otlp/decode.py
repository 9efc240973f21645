"""OTLP export requests (opentelemetry-proto's messages) → the rows the store writes.

The instance and tenant of every row come from the ingest token, never from the payload: the
resource keeps what the sender said, except `ctrlmesh.instance.id` and `ctrlmesh.tenant.id`,
which are overwritten with the token's, so nothing read back can carry a forged owner. A span
or point the store cannot hold (malformed ids, a time outside the retention window) is counted
as rejected for OTLP's partial-success answer rather than failing the whole export.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

INSTANCE_ATTR = "ctrlmesh.instance.id"
TENANT_ATTR = "ctrlmesh.tenant.id"
RELEASE_ATTR = "ctrlmesh.release.id"

SPAN_COLUMNS = (
    "tenant_id",
    "instance_id",
    "trace_id",
    "span_id",
    "parent_span_id",
    "root",
    "name",
    "kind",
    "status",
    "status_message",
    "start_time",
    "duration_ns",
    "attributes",
    "resource",
    "scope",
)
POINT_COLUMNS = (
    "tenant_id",
    "instance_id",
    "name",
    "type",
    "unit",
    "temporality",
    "monotonic",
    "attributes",
    "resource",
    "time",
    "start_time",
    "value",
    "count",
    "bounds",
    "bucket_counts",
)

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUS = {
    trace_pb2.Status.STATUS_CODE_UNSET: "unset",
    trace_pb2.Status.STATUS_CODE_OK: "ok",
    trace_pb2.Status.STATUS_CODE_ERROR: "error",
}
_TEMPORALITY: dict[Any, str] = {
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "delta",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}
_REMOTE = trace_pb2.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | trace_pb2.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BadPayload(ValueError):
    """The bytes are not an export request of this signal."""


@dataclass(frozen=True)
class Owner:
    """Who an export belongs to, as its token says."""

    instance_id: str
    tenant_id: str


@dataclass
class Decoded:
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if reason not in self.reasons and len(self.reasons) < 5:
            self.reasons.append(reason)

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


def value_of(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in kvs}


def _time(nanos: int) -> datetime:
    return _EPOCH + timedelta(microseconds=nanos // 1000)


def _resource(res: Any, owner: Owner) -> str:
    attrs = attributes(res.attributes)
    attrs[INSTANCE_ATTR] = owner.instance_id
    attrs[TENANT_ATTR] = owner.tenant_id
    return json.dumps(attrs)


class Window:
    """The times the store accepts: not older than the retention, at most a day ahead."""

    def __init__(self, now: datetime, retention: timedelta):
        self.low = now - retention
        self.high = now + timedelta(days=1)

    def holds(self, t: datetime) -> bool:
        return self.low <= t <= self.high


def spans(req: trace_service_pb2.ExportTraceServiceRequest, owner: Owner, window: Window) -> Decoded:
    out = Decoded()
    for rs in req.resource_spans:
        resource = _resource(rs.resource, owner)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for sp in ss.spans:
                if len(sp.trace_id) != 16 or len(sp.span_id) != 8 or not any(sp.trace_id):
                    out.reject("span with an invalid trace_id or span_id")
                    continue
                if sp.parent_span_id and len(sp.parent_span_id) != 8:
                    out.reject("span with an invalid parent_span_id")
                    continue
                start = _time(sp.start_time_unix_nano)
                if not window.holds(start):
                    out.reject("span outside the retention window")
                    continue
                parent = sp.parent_span_id.hex()
                out.rows.append(
                    (
                        owner.tenant_id,
                        owner.instance_id,
                        sp.trace_id.hex(),
                        sp.span_id.hex(),
                        parent,
                        not parent or (sp.flags & _REMOTE) == _REMOTE,
                        sp.name,
                        _KINDS.get(sp.kind, "internal"),
                        _STATUS.get(sp.status.code, "unset"),
                        sp.status.message,
                        start,
                        max(0, sp.end_time_unix_nano - sp.start_time_unix_nano),
                        json.dumps(attributes(sp.attributes)),
                        resource,
                        scope,
                    )
                )
    return out


def points(req: metrics_service_pb2.ExportMetricsServiceRequest, owner: Owner, window: Window) -> Decoded:
    out = Decoded()
    for rm in req.resource_metrics:
        resource = _resource(rm.resource, owner)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is None or not m.name:
                    out.reject("metric without a name or data")
                    continue
                data: Any = getattr(m, kind)
                temporality = (
                    _TEMPORALITY.get(data.aggregation_temporality, "")
                    if kind != "gauge" and kind != "summary"
                    else ""
                )
                monotonic = bool(getattr(data, "is_monotonic", False))
                for dp in data.data_points:
                    t = _time(dp.time_unix_nano)
                    if not window.holds(t):
                        out.reject("point outside the retention window")
                        continue
                    start = _time(dp.start_time_unix_nano) if dp.start_time_unix_nano else None
                    count: int | None = None
                    bounds: list[float] | None = None
                    buckets: list[int] | None = None
                    if kind in ("gauge", "sum"):
                        which = dp.WhichOneof("value")
                        value = float(getattr(dp, which)) if which else 0.0
                    else:
                        value, count = float(dp.sum), int(dp.count)
                        if kind == "histogram":
                            bounds, buckets = list(dp.explicit_bounds), list(dp.bucket_counts)
                    out.rows.append(
                        (
                            owner.tenant_id,
                            owner.instance_id,
                            m.name,
                            kind,
                            m.unit,
                            temporality,
                            monotonic,
                            json.dumps(attributes(dp.attributes)),
                            resource,
                            t,
                            start,
                            value,
                            count,
                            bounds,
                            buckets,
                        )
                    )
    return out


# -- wire formats ------------------------------------------------------------------------------

_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _ID_FIELDS and isinstance(v, str):
                try:
                    v = base64.b64encode(bytes.fromhex(v)).decode()
                except ValueError as err:
                    raise BadPayload(f"{k} is not hex") from err
            else:
                v = _hex_ids_to_base64(v)
            out[k] = v
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(x) for x in node]
    return node


def parse(body: bytes, message: Any, *, json_body: bool) -> Any:
    """The export request in `body` (protobuf or OTLP/JSON); BadPayload when it is not one."""
    msg = message()
    try:
        if json_body:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise BadPayload("the body is not a JSON object")
            # Receivers must ignore fields they do not know (OTLP's forward compatibility).
            json_format.ParseDict(_hex_ids_to_base64(data), msg, ignore_unknown_fields=True)
        else:
            msg.ParseFromString(body)
    except BadPayload:
        raise
    except Exception as err:  # DecodeError, ParseError, UnicodeError, RecursionError: all "not OTLP"
        raise BadPayload(f"not an OTLP {message.DESCRIPTOR.name}") from err
    return msg
