"""JSON ⇄ protobuf for the edge, with the rules written down in gateway/README.md.

Requests: the body (whole message for `body: "*"`, one field otherwise) is parsed strictly;
path variables and then query parameters fill the remaining fields, converted by field type.
Responses: proto3 JSON with the proto field names (snake_case); every field is present — unset
message and `optional` fields as `null`; 64-bit integers as JSON numbers; `response_body`
selects one field (Zectre's plain arrays).
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from libs.errors import InvalidArgument

# The pure-Python and upb descriptor classes differ for type checkers; both expose the same API.
Descriptor = Any
Field = Any

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
    strings = _string_fields(desc)
    if all(isinstance(v, str) and k in strings for k, v in data.items()):
        # Only plain text fields (a GET by id): json_format would set them as they are.
        return cls(**data)
    msg = cls()
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise InvalidArgument(f"invalid request: {err}", fields=_parse_error_fields(str(err))) from None
    return msg


_STRING_FIELDS: dict[str, frozenset[str]] = {}


def _string_fields(desc: Descriptor) -> frozenset[str]:
    """The singular string fields of a message type, outside any oneof."""
    found = _STRING_FIELDS.get(desc.full_name)
    if found is None:
        found = _STRING_FIELDS[desc.full_name] = frozenset(
            f.name
            for f in desc.fields
            if f.type == FieldDescriptor.TYPE_STRING and not _is_repeated(f) and f.containing_oneof is None
        )
    return found


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
    """The response as JSON-ready data, by the rules above: a converter compiled once per message
    type (`_compile`), equal to `to_json_reference` for every message (tests/unit/test_edge_hotpath.py)."""
    data = _converter(msg.DESCRIPTOR)(msg)
    if response_body:
        return data.get(response_body)
    return data


def to_json_reference(msg: Message, response_body: str = "") -> Any:
    """The rules as json_format applies them, field by field at every call: what `to_json` is
    measured against, and what it uses for the well-known types."""
    data = _reference(msg)
    if response_body:
        return data.get(response_body)
    return data


def _reference(msg: Message) -> Any:
    data = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if isinstance(data, dict):
        _complete(data, msg.DESCRIPTOR)
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


# -- the compiled converters ---------------------------------------------------------------------
#
# MessageToDict walks the descriptor and decides every field's conversion again for every
# message; a 20-item list page cost more than a millisecond. Here each message type is looked at
# once: its set fields are converted by a function chosen for their type, then the absent ones
# are filled in descriptor order, exactly as MessageToDict and `_complete` would (same values,
# same key order). Types outside the plain cases (well-known types but Timestamp, 32-bit floats,
# enum values with their own JSON names, closed enums) keep json_format's conversion.

Convert = Any  # Callable[[Any], Any]; the values are protobuf's own containers and scalars
_CONVERTERS: dict[str, Convert] = {}


def _converter(desc: Descriptor) -> Convert:
    fn = _CONVERTERS.get(desc.full_name)
    if fn is None:
        fn = _CONVERTERS[desc.full_name] = _compile(desc)
    return fn


def _compile(desc: Descriptor) -> Convert:
    if desc.full_name == "google.protobuf.Timestamp":
        return _timestamp
    if desc.full_name.startswith("google.protobuf.") or any(not _plain(f) for f in desc.fields):
        return _reference
    by_number: dict[int, tuple[str, Convert]] = {}
    absent: list[tuple[str, int, Any]] = []  # (name, how, default): 0 value, 1 [], 2 {}, 3 None
    for f in desc.fields:
        by_number[f.number] = (f.name, _field_converter(f))
        if _is_map(f):
            absent.append((f.name, 2, None))
        elif _is_repeated(f):
            absent.append((f.name, 1, None))
        elif f.has_presence:
            # Presence fields are skipped by MessageToDict; `_complete` adds them last, as null.
            continue
        else:
            absent.append((f.name, 0, _scalar(f)(f.default_value)))
    absent += [(f.name, 3, None) for f in desc.fields if not _is_repeated(f) and f.has_presence]

    def convert(msg: Any) -> Any:
        js: dict[str, Any] = {}
        for f, value in msg.ListFields():
            entry = by_number.get(f.number)
            if entry is None or f.is_extension:  # an extension: json_format names it its way
                return _reference(msg)
            js[entry[0]] = entry[1](value)
        if len(js) < len(by_number):
            for name, how, default in absent:
                if name not in js:
                    js[name] = default if how == 0 else [] if how == 1 else {} if how == 2 else None
        return js

    return convert


def _plain(f: Field) -> bool:
    """A field whose conversion is compiled (anything else leaves the message to json_format)."""
    if f.is_extension:
        return False
    if _is_map(f):
        return _plain(f.message_type.fields_by_name["key"]) and _plain(f.message_type.fields_by_name["value"])
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return False
    if f.type == FieldDescriptor.TYPE_ENUM:
        e = f.enum_type
        return not e.is_closed and not any(v.GetOptions().ListFields() for v in e.values)
    return True


def _is_map(f: Field) -> bool:
    return f.message_type is not None and bool(f.message_type.GetOptions().map_entry)


def _field_converter(f: Field) -> Convert:
    if _is_map(f):
        key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        value_conv = _single(value_f)
        bool_keys = key_f.type == FieldDescriptor.TYPE_BOOL

        def convert_map(value: Any) -> dict[str, Any]:
            if bool_keys:
                return {("true" if k else "false"): value_conv(value[k]) for k in value}
            return {str(k): value_conv(value[k]) for k in value}

        return convert_map
    one = _single(f)
    if _is_repeated(f):
        return lambda value: [one(v) for v in value]
    return one


def _single(f: Field) -> Convert:
    if f.message_type is not None:
        desc = f.message_type

        # Looked up at each call, not now: message types may refer to each other in a cycle.
        def convert_message(value: Any) -> Any:
            return _converter(desc)(value)

        return convert_message
    return _scalar(f)


def _scalar(f: Field) -> Convert:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return str
    if t == FieldDescriptor.TYPE_BOOL:
        return bool
    if t in _INTS:
        return int
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _double
    if t == FieldDescriptor.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode("utf-8")
    if t == FieldDescriptor.TYPE_ENUM:
        names = {v.number: v.name for v in f.enum_type.values}
        return lambda value: names.get(value, value)
    raise AssertionError(f"no compiled conversion for {f.full_name}")  # _plain keeps these out


def _double(value: float) -> Any:
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return value


def _timestamp(msg: Any) -> str:
    return str(msg.ToJsonString())
