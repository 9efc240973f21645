"""OpenAPI 3.1 for the whole REST surface, generated from the same descriptors as the routes."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import protovalidate
from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

from gateway.routes import PUBLIC_ROUTES, Route, load_routes
from gateway.transcode import _FLOATS, _INT64, _INTS, Descriptor, _is_repeated
from libs.errors import REASONS

_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$", "examples": ["30s"]},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Empty": {"type": "object"},
}
_ERROR = {
    "type": "object",
    "required": ["error", "message", "details"],
    "properties": {
        "error": {"type": "string", "description": "Stable reason name (BadRequest, NotFound, ...)"},
        "message": {"type": "string"},
        "details": {"type": "object", "additionalProperties": True},
    },
}


# The generated module has no type stubs (mypy-protobuf skips the buf package).
validate_pb2: Any = _validate_pb2

_STRING_FORMATS = {
    "uuid": "uuid",
    "email": "email",
    "hostname": "hostname",
    "uri": "uri",
    "uri_ref": "uri-reference",
    "ipv4": "ipv4",
    "ipv6": "ipv6",
}
_NUMBER_RULES = (
    "float",
    "double",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "sint32",
    "sint64",
    "fixed32",
    "fixed64",
    "sfixed32",
    "sfixed64",
)


def _field_rules(f: FieldDescriptor) -> Any:
    opts = f.GetOptions()
    return opts.Extensions[validate_pb2.field] if opts.HasExtension(validate_pb2.field) else None


def _rule_keywords(rules: Any) -> dict[str, Any]:
    """The JSON Schema keywords of one field's scalar `buf.validate` rules (the server enforces
    exactly these, so clients and fuzzers see what will be refused)."""
    kind = rules.WhichOneof("type")
    out: dict[str, Any] = {}
    if kind == "string":
        r = rules.string
        if r.HasField("len"):
            out["minLength"] = out["maxLength"] = r.len
        if r.HasField("min_len"):
            out["minLength"] = r.min_len
        if r.HasField("max_len"):
            out["maxLength"] = r.max_len
        patterns = [r.pattern] if r.HasField("pattern") else []
        if r.HasField("prefix"):
            patterns.append("^" + re.escape(r.prefix))
        if r.HasField("suffix"):
            patterns.append(re.escape(r.suffix) + "$")
        if r.HasField("contains"):
            patterns.append(re.escape(r.contains))
        if patterns:
            out["pattern"] = patterns[0]
            if len(patterns) > 1:
                out["allOf"] = [{"pattern": p} for p in patterns[1:]]
        if r.HasField("const"):
            out["const"] = r.const
        if len(r.__getattribute__("in")):
            out["enum"] = list(r.__getattribute__("in"))
        if r.not_in:
            out["not"] = {"enum": list(r.not_in)}
        well_known = r.WhichOneof("well_known")
        if well_known in _STRING_FORMATS and getattr(r, well_known):
            out["format"] = _STRING_FORMATS[well_known]
        if r.HasField("max_bytes"):
            out["description"] = f"At most {r.max_bytes} bytes (UTF-8)."
    elif kind in _NUMBER_RULES:
        r = getattr(rules, kind)
        for name, keyword in (("gt", "exclusiveMinimum"), ("gte", "minimum")):
            if r.HasField(name):
                out[keyword] = getattr(r, name)
        for name, keyword in (("lt", "exclusiveMaximum"), ("lte", "maximum")):
            if r.HasField(name):
                out[keyword] = getattr(r, name)
        if r.HasField("const"):
            out["const"] = r.const
        if len(r.__getattribute__("in")):
            out["enum"] = list(r.__getattribute__("in"))
        if r.not_in:
            out["not"] = {"enum": list(r.not_in)}
    elif kind == "duration":
        r = rules.duration
        bounds = []
        for name, word in (("gt", "more than"), ("gte", "at least"), ("lt", "less than"), ("lte", "at most")):
            if r.HasField(name):
                d = getattr(r, name)
                bounds.append(f"{word} {d.seconds + d.nanos / 1e9:g}s")
        if bounds:
            out["description"] = "Duration " + " and ".join(bounds) + "."
    elif kind == "enum" and rules.enum.defined_only:
        pass  # the schema's enum already lists the defined values only
    cel = [c.message or c.expression for c in rules.cel]
    if cel:
        out["description"] = " ".join([out.get("description", ""), *cel]).strip()
    return out


def _zero(f: FieldDescriptor) -> Any:
    if f.type in _INTS or f.type in _FLOATS:
        return 0
    if f.type == FieldDescriptor.TYPE_BOOL:
        return False
    return ""


def _apply(base: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    if not keywords:
        return base
    if "$ref" in base:
        return {"allOf": [base, keywords]}
    return {**base, **keywords}


def required_fields(desc: Descriptor) -> list[str]:
    """Fields whose zero value the server's rules refuse: leaving them out is refused too, so
    they are `required`. Asked of protovalidate itself, so it can never disagree with it."""
    if desc.full_name in _WKT:
        return []
    empty = message_factory.GetMessageClass(desc)()
    names: list[str] = []
    for v in protovalidate.collect_violations(empty):
        elements = v.proto.field.elements if v.proto.field is not None else []
        if len(elements) >= 1 and elements[0].field_name not in names:
            names.append(elements[0].field_name)
    return [f.name for f in desc.fields if f.name in names]


_HEALTH = {
    "type": "object",
    "required": ["status", "version"],
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "degraded"]},
        "version": {"type": "string"},
        "failing": {
            "type": "object",
            "description": "Each failing service with its gRPC health status or error code.",
            "additionalProperties": {"type": "string"},
        },
    },
}
# The edge's own routes (PUBLIC_ROUTES): no key, so `security: []`.
_PUBLIC_OPS: dict[str, dict[str, Any]] = {
    "/health": {
        "operationId": "Edge_Health",
        "security": [],
        "responses": {
            "200": {"description": "healthy", "content": {"application/json": {"schema": _HEALTH}}},
            "503": {"description": "degraded", "content": {"application/json": {"schema": _HEALTH}}},
        },
    },
    "/openapi.json": {
        "operationId": "Edge_OpenApi",
        "security": [],
        "responses": {
            "200": {
                "description": "This document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    },
    "/metrics": {
        "operationId": "Edge_Metrics",
        "security": [],
        "responses": {
            "200": {
                "description": "Prometheus text: request counters and latency by route template and status.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    },
}


def _error_statuses(has_body: bool) -> dict[int, list[tuple[str, str]]]:
    """Every error status an operation can answer, from the reasons catalogue. Not 500: an
    internal error is a bug, so the contract leaves it undocumented and a fuzzer flags it; not
    405, which only a path's undeclared verbs answer; 413 and 415 only where there is a body."""
    out: dict[int, list[tuple[str, str]]] = {}
    for reason in REASONS.values():
        if reason.http in (405, 500) or (reason.http in (413, 415) and not has_body):
            continue
        out.setdefault(reason.http, []).append((reason.name, reason.doc))
    return dict(sorted(out.items()))


def _schema_name(desc: Descriptor) -> str:
    return desc.full_name.removeprefix("ctrlmesh.").replace(".", "_")


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": _ERROR}

    def field_schema(self, f: FieldDescriptor) -> dict[str, Any]:
        rules = _field_rules(f)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.field_schema(vf)}
            if rules is not None and rules.WhichOneof("type") == "map":
                m = rules.map
                if m.HasField("min_pairs"):
                    schema["minProperties"] = m.min_pairs
                if m.HasField("max_pairs"):
                    schema["maxProperties"] = m.max_pairs
                if m.HasField("keys"):
                    names = _rule_keywords(m.keys)
                    names.pop("description", None)
                    if names:
                        schema["propertyNames"] = names
                if m.HasField("values"):
                    schema["additionalProperties"] = _apply(
                        schema["additionalProperties"], _rule_keywords(m.values)
                    )
            return schema
        base = self._base_schema(f)
        if _is_repeated(f):
            array: dict[str, Any] = {"type": "array", "items": base}
            if rules is not None and rules.WhichOneof("type") == "repeated":
                r = rules.repeated
                if r.HasField("min_items"):
                    array["minItems"] = r.min_items
                if r.HasField("max_items"):
                    array["maxItems"] = r.max_items
                if r.unique:
                    array["uniqueItems"] = True
                if r.HasField("items"):
                    array["items"] = _apply(base, _rule_keywords(r.items))
            return array
        keywords = _rule_keywords(rules) if rules is not None else {}
        ruled = _apply(base, keywords)
        if (
            keywords
            and rules is not None
            and rules.ignore == validate_pb2.IGNORE_IF_ZERO_VALUE
            and f.message_type is None
        ):
            # The rules hold only for a value that is set; the zero value passes as such.
            ruled = {"anyOf": [{"const": _zero(f)}, ruled]}
        if f.message_type is not None or f.has_presence:
            return {"anyOf": [ruled, {"type": "null"}]}
        return ruled

    def _base_schema(self, f: FieldDescriptor) -> dict[str, Any]:
        base: dict[str, Any]
        if f.message_type is not None:
            base = self.ref(f.message_type)
        elif f.type in _INTS:
            base = {"type": "integer", "format": "int64" if f.type in _INT64 else "int32"}
        elif f.type in _FLOATS:
            base = {"type": "number"}
        elif f.type == FieldDescriptor.TYPE_BOOL:
            base = {"type": "boolean"}
        elif f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
            base = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
        elif f.type == FieldDescriptor.TYPE_BYTES:
            base = {"type": "string", "contentEncoding": "base64"}
        else:
            base = {"type": "string"}
        return base

    def ref(self, desc: Descriptor) -> dict[str, Any]:
        if desc.full_name in _WKT:
            return dict(_WKT[desc.full_name])
        name = _schema_name(desc)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            schema: dict[str, Any] = {
                "type": "object",
                "properties": {f.name: self.field_schema(f) for f in desc.fields},
                # Requests refuse unknown fields (rule 4); responses carry exactly these.
                "additionalProperties": False,
            }
            required = required_fields(desc)
            if required:
                schema["required"] = required
            cel = [c.message or c.expression for c in _message_cel(desc)]
            if cel:
                schema["description"] = " ".join(cel)
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def body_schema(self, desc: Descriptor, path_fields: list[str]) -> dict[str, Any]:
        """The body of a `body: "*"` route: the request message less the fields its path sets."""
        if not path_fields:
            return self.ref(desc)
        self.ref(desc)
        full = self.schemas[_schema_name(desc)]
        body = {
            **full,
            "properties": {k: v for k, v in full["properties"].items() if k not in path_fields},
        }
        required = [f for f in full.get("required", []) if f not in path_fields]
        body.pop("required", None)
        if required:
            body["required"] = required
        name = _schema_name(desc) + "_Body"
        self.schemas[name] = body
        return {"$ref": f"#/components/schemas/{name}"}


def _message_cel(desc: Descriptor) -> list[Any]:
    opts = desc.GetOptions()
    if not opts.HasExtension(validate_pb2.message):
        return []
    return list(opts.Extensions[validate_pb2.message].cel)


def _param_schema(f: FieldDescriptor, b: _Builder, in_path: bool = False) -> dict[str, Any]:
    """A parameter is never JSON null: drop that alternative; a path segment is never empty."""
    s = b.field_schema(f)
    if "anyOf" in s and {"type": "null"} in s["anyOf"]:
        rest = [x for x in s["anyOf"] if x != {"type": "null"}]
        s = rest[0] if len(rest) == 1 else {"anyOf": rest}
    if in_path and s.get("type") == "string" and "minLength" not in s:
        s = {**s, "minLength": 1}
    return s


def build_openapi(routes: list[Route], version: str) -> dict[str, Any]:
    b = _Builder()
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "operationId": f"{r.method.containing_service.name}_{r.method.name}",
            "tags": [r.method.containing_service.name],
            "parameters": [],
            "responses": {},
        }
        for name in r.path_fields:
            f = r.input.fields_by_name[name]
            op["parameters"].append(
                {"name": name, "in": "path", "required": True, "schema": _param_schema(f, b, True)}
            )
        if not r.body:
            required = set(required_fields(r.input))
            for f in r.input.fields:
                if f.name in r.path_fields or (
                    f.message_type is not None and f.message_type.full_name not in _WKT
                ):
                    continue
                op["parameters"].append(
                    {
                        "name": f.name,
                        "in": "query",
                        "required": f.name in required,
                        "schema": _param_schema(f, b),
                    }
                )
        elif r.body == "*":
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": b.body_schema(r.input, r.path_fields)}},
            }
        else:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": b.field_schema(r.input.fields_by_name[r.body])}},
            }
        if r.streaming:
            op["responses"]["200"] = {
                "description": "Server-Sent Events; each `data:` line is one JSON message of this schema.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        else:
            out = (
                b.field_schema(r.output.fields_by_name[r.response_body])
                if r.response_body
                else b.ref(r.output)
            )
            if r.status == 204:
                op["responses"]["204"] = {"description": "Done."}
            else:
                op["responses"][str(r.status)] = {
                    "description": "OK",
                    "content": {"application/json": {"schema": out}},
                }
            if r.empty_status:
                op["responses"][str(r.empty_status)] = {"description": "Done at once; no body."}
        for status, reasons in _error_statuses(bool(r.body)).items():
            op["responses"][str(status)] = {
                "description": "; ".join(f"`{n}`: {d}" for n, d in reasons),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        doc = r.method.GetOptions()
        del doc
        paths.setdefault(r.template, {})[r.http_method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ctrlmesh",
            "version": version,
            "description": "SPG99 /v2, Ctrl Plane /v1 and Zectre /api/v1, served by one edge.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            **{path: {method.lower(): _PUBLIC_OPS[path]} for method, path in PUBLIC_ROUTES},
            **dict(sorted(paths.items(), key=lambda kv: re.sub(r"\{.*?\}", "", kv[0]))),
        },
        "components": {
            "schemas": b.schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


if __name__ == "__main__":
    json.dump(build_openapi(load_routes(), "0.1.0"), sys.stdout, indent=2)
    sys.stdout.write("\n")
