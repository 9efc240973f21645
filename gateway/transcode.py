"""JSON ⇄ protobuf for the edge, with the rules written down in gateway/README.md.

Requests: the body (whole message for `body: "*"`, one field otherwise) is parsed strictly;
path variables and then query parameters fill the remaining fields, converted by field type.
Responses: proto3 JSON with the proto field names (snake_case); every field is present — unset
message and `optional` fields as `null`; 64-bit integers as JSON numbers; `response_body`
selects one field (Zectre's plain arrays).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from libs.errors import InvalidArgument

# The pure-Python and upb descriptor classes differ for type checkers; both expose the same API.
Descriptor = Any

_WKT_JSON_SCALARS = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.FieldMask",
    "google.protobuf.Empty",
}
_INTS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def _scalar_from_text(f: FieldDescriptor, raw: str, where: str) -> Any:
    """Convert one path or query value to what json_format expects for this field."""
    try:
        if f.type in _INTS:
            return int(raw)
        if f.type in _FLOATS:
            return float(raw)
        if f.type == FieldDescriptor.TYPE_BOOL:
            low = raw.lower()
            if low in ("true", "1", ""):
                return True
            if low in ("false", "0"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise InvalidArgument(
            f"{where} {f.name!r}: {raw!r} is not a valid {_type_name(f)}",
            fields={f.name: f"not a valid {_type_name(f)}"},
        ) from None
    return raw


def _type_name(f: FieldDescriptor) -> str:
    if f.type in _INTS:
        return "integer"
    if f.type in _FLOATS:
        return "number"
    if f.type == FieldDescriptor.TYPE_BOOL:
        return "boolean"
    return "string"


def _set_path(target: dict[str, Any], desc: Descriptor, dotted: str, values: list[str], where: str) -> None:
    parts = dotted.split(".")
    node, d = target, desc
    for i, part in enumerate(parts):
        f = d.fields_by_name.get(part)
        if f is None:
            raise InvalidArgument(f"unknown {where} {dotted!r}", fields={dotted: f"unknown {where}"})
        last = i == len(parts) - 1
        if not last:
            if f.message_type is None or f.message_type.full_name in _WKT_JSON_SCALARS:
                raise InvalidArgument(f"unknown {where} {dotted!r}", fields={dotted: f"unknown {where}"})
            node = node.setdefault(part, {})
            d = f.message_type
            continue
        if f.message_type is not None and f.message_type.full_name not in (
            "google.protobuf.Timestamp",
            "google.protobuf.Duration",
            "google.protobuf.FieldMask",
        ):
            raise InvalidArgument(
                f"{where} {dotted!r} cannot be set from text", fields={dotted: "not a scalar"}
            )
        if _is_repeated(f):
            node[part] = [_scalar_from_text(f, v, where) for v in values]
        else:
            if len(values) > 1:
                raise InvalidArgument(
                    f"{where} {dotted!r} given more than once", fields={dotted: "given more than once"}
                )
            node[part] = _scalar_from_text(f, values[0], where)


def build_request(
    cls: type[Message],
    *,
    body_field: str,
    body: Any,
    path_params: dict[str, str],
    query: list[tuple[str, str]],
    ignored_query: frozenset[str] = frozenset({"token"}),
) -> Message:
    desc = cls.DESCRIPTOR
    data: dict[str, Any] = {}
    if body_field == "*":
        if body is not None:
            if not isinstance(body, dict):
                raise InvalidArgument(
                    "the request body must be a JSON object", fields={"body": "not an object"}
                )
            data = dict(body)
    elif body_field:
        data[body_field] = body
    bound = set(path_params)
    for name, value in path_params.items():
        _set_path(data, desc, name, [value], "path parameter")
    grouped: dict[str, list[str]] = {}
    for k, v in query:
        if k in ignored_query and k not in desc.fields_by_name:
            continue
        grouped.setdefault(k, []).append(v)
    for name, values in grouped.items():
        if body_field == "*" or name in bound or name.split(".")[0] == body_field:
            raise InvalidArgument(
                f"query parameter {name!r} is not accepted here", fields={name: "not accepted"}
            )
        _set_path(data, desc, name, values, "query parameter")
    msg = cls()
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise InvalidArgument(f"invalid request: {err}", fields=_parse_error_fields(str(err))) from None
    return msg


def _parse_error_fields(text: str) -> dict[str, str]:
    # json_format names the field in its message; surface it as the failing field when it does.
    for marker in ("Failed to parse ", 'no field named "'):
        if marker in text:
            rest = text.split(marker, 1)[1]
            name = rest.split(" field", 1)[0].split('"', 1)[0]
            if name and " " not in name:
                return {name: text}
    return {"body": text}


def to_json(msg: Message, response_body: str = "") -> Any:
    data = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _complete(data, msg.DESCRIPTOR)
    if response_body:
        return data.get(response_body)
    return data


def _complete(data: dict[str, Any], desc: Descriptor) -> None:
    """Add nulls for unset presence fields and turn 64-bit integer strings back into numbers."""
    if desc.full_name in _WKT_JSON_SCALARS:
        return
    for f in desc.fields:
        name = f.name
        if name not in data:
            if not _is_repeated(f) and (f.message_type is not None or f.has_presence):
                data[name] = None
            continue
        value = data[name]
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                if vf.message_type is not None and isinstance(v, dict):
                    _complete(v, vf.message_type)
                elif vf.type in _INT64:
                    value[k] = int(v)
            continue
        if f.message_type is not None:
            items = value if _is_repeated(f) else [value]
            for item in items:
                if isinstance(item, dict):
                    _complete(item, f.message_type)
        elif f.type in _INT64:
            data[name] = [int(v) for v in value] if _is_repeated(f) else int(value)
