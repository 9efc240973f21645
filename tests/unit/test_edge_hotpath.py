"""The edge's per-request work done once at start gives the same answers as doing it per request:
the router's shape index against trying every template in order, and the compiled response
converters against json_format's walk of every message."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from gateway.routes import Route, Router, load_routes
from gateway.transcode import to_json, to_json_reference

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# Values a client may put where a template has a variable: ordinary ids, literal words of other
# templates, and the bytes a fuzzer sends (decoded as the server decodes them).
VALUES = ("db_1", "me", "v2", "a b", "é", "x\ny", "%2F", "a:b", "", ".")


def linear(routes: list[Route], method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The router as it was: every template tried in order."""
    allowed: set[str] = set()
    found: tuple[Route, dict[str, str]] | None = None
    for r in routes:
        m = r.regex.match(path)
        if m is None:
            continue
        allowed.add(r.http_method)
        if found is None and r.http_method == method:
            found = r, {k.replace("__", "."): v for k, v in m.groupdict().items()}
    if found is None:
        return None, {}, sorted(allowed)
    return found[0], found[1], sorted(allowed)


def paths(routes: list[Route]) -> set[str]:
    out = {"/", "", "/v2", "/v2/", "//", "/health", "/v2/dbs/x/", "/v2/dbs//x", "/nope/x"}
    for r in routes:
        fields = r.path_fields
        for combo in itertools.islice(itertools.product(VALUES, repeat=len(fields)), 40):
            p = r.template
            for f, v in zip(fields, combo, strict=True):
                p = p.replace("{" + f + "}", v, 1)
            out |= {p, p + "/", p + "\n", p + "/extra", p.rstrip("/") + "x"}
    return out


def test_indexed_router_answers_exactly_as_trying_every_template():
    """For every template filled with ordinary and hostile values, and near misses of it, under
    every method: the same route, path parameters and `Allow` methods as the linear scan."""
    routes = load_routes()
    router = Router(routes)
    checked = 0
    for path in paths(routes):
        for method in METHODS:
            assert router.match(method, path) == linear(routes, method, path), (method, path)
            checked += 1
    assert checked > 1000


# -- responses: the compiled converters against json_format's own walk ---------------------------


def _all_message_types() -> list[Any]:
    load_routes()  # imports every generated module
    found: list[Any] = []

    def walk(desc: Any) -> None:
        if desc.GetOptions().map_entry:
            return
        found.append(desc)
        for nested in desc.nested_types:
            walk(nested)

    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if name.startswith("ctrlmesh.") and name.endswith("_pb2"):
            for desc in mod.DESCRIPTOR.message_types_by_name.values():
                walk(desc)
    return found


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = ("", "a", "é ü", "日本", "x\ny", '"q"', "0", "-1")


def _scalar_value(f: Any, rng: random.Random) -> Any:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(_TEXT)
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(5)))
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return rng.choice([0, 1, -1 if lo else 2, lo, hi, rng.randint(lo, hi)])
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(
            [
                0.0,
                -0.0,
                1.5,
                -2.25,
                1e300 if t == FieldDescriptor.TYPE_DOUBLE else 3.4e38,
                math.inf,
                -math.inf,
                math.nan,
                0.1,
            ]
        )
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        return rng.choice([*numbers, 99]) if not f.enum_type.is_closed else rng.choice(numbers)
    raise AssertionError(t)


def _fill_wkt(msg: Any, rng: random.Random) -> None:
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        msg.seconds, msg.nanos = rng.randint(0, 4_000_000_000), rng.choice([0, 1000, 123_456_789])
    elif name == "google.protobuf.Duration":
        msg.seconds, msg.nanos = rng.randint(0, 10**6), rng.choice([0, 5_000_000])
    elif name == "google.protobuf.Struct":
        msg.update({"a": 1, "b": [1, "x", True, None], "c": {"d": "e"}})
    elif name == "google.protobuf.FieldMask":
        msg.paths.extend(["a.b", "c"])
    elif name == "google.protobuf.Empty":
        pass
    elif (
        "value" in msg.DESCRIPTOR.fields_by_name
        and name.endswith("Value")
        and name != "google.protobuf.Value"
    ):
        msg.value = _scalar_value(msg.DESCRIPTOR.fields_by_name["value"], rng)
    elif name == "google.protobuf.Value":
        msg.string_value = "v"


def _fill(msg: Any, rng: random.Random, depth: int = 0) -> None:
    if msg.DESCRIPTOR.full_name.startswith("google.protobuf."):
        _fill_wkt(msg, rng)
        return
    for f in msg.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            target = getattr(msg, f.name)
            for _ in range(rng.randrange(3)):
                k = _scalar_value(key_f, rng)
                if value_f.message_type is not None:
                    if depth < 3:
                        _fill(target[k], rng, depth + 1)
                else:
                    target[k] = _scalar_value(value_f, rng)
            continue
        if f.message_type is not None:
            if depth >= 3:
                continue
            if f.is_repeated:
                for _ in range(rng.randrange(3)):
                    _fill(getattr(msg, f.name).add(), rng, depth + 1)
            else:
                sub = getattr(msg, f.name)
                sub.SetInParent()
                _fill(sub, rng, depth + 1)
            continue
        if f.is_repeated:
            getattr(msg, f.name).extend(_scalar_value(f, rng) for _ in range(rng.randrange(3)))
        else:
            setattr(msg, f.name, _scalar_value(f, rng))


def test_compiled_response_conversion_equals_json_format_for_every_message():
    """Every message type of every contract, filled at random (unset fields, defaults, extremes of
    each integer type, infinities and NaN, unknown enum numbers, maps, nested and well-known
    types): the compiled converter gives the same JSON, key order included, as json_format."""
    rng = random.Random(14)
    types = _all_message_types()
    assert len(types) > 100
    checked = 0
    for desc in types:
        cls = message_factory.GetMessageClass(desc)
        for _ in range(25):
            msg = cls()
            _fill(msg, rng)
            fast, reference = to_json(msg), to_json_reference(msg)
            assert fast == reference and json.dumps(fast) == json.dumps(reference), desc.full_name
            checked += 1
        assert json.dumps(to_json(cls())) == json.dumps(to_json_reference(cls()))
    assert checked > 2500


def test_requests_of_plain_text_fields_are_the_messages_json_format_builds():
    """A request whose fields are all plain strings (a GET by id, a contact update) is made
    directly; it equals what json_format builds from the same body and path, field for field."""
    from google.protobuf import json_format

    from gateway.transcode import build_request

    rng = random.Random(5)
    checked = 0
    for route in load_routes():
        cls = route.request_class()
        strings = [
            f.name
            for f in cls.DESCRIPTOR.fields
            if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and f.containing_oneof is None
        ]
        if not strings:
            continue
        body = {name: rng.choice(_TEXT) for name in strings}
        reference = cls()
        json_format.ParseDict(body, reference)
        built = build_request(cls, body_field="*", body=body, path_params={}, query=[])
        assert built == reference and built.SerializeToString(deterministic=True) == (
            reference.SerializeToString(deterministic=True)
        )
        checked += 1
    assert checked > 20
