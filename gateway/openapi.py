"""OpenAPI 3.1 for the whole REST surface, generated from the same descriptors as the routes."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from gateway.routes import Route, load_routes
from gateway.transcode import _FLOATS, _INT64, _INTS, Descriptor, _is_repeated

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


def _schema_name(desc: Descriptor) -> str:
    return desc.full_name.removeprefix("ctrlmesh.").replace(".", "_")


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": _ERROR}

    def field_schema(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            return {
                "type": "object",
                "additionalProperties": self.field_schema(f.message_type.fields_by_name["value"]),
            }
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
        if _is_repeated(f):
            return {"type": "array", "items": base}
        if f.message_type is not None or f.has_presence:
            return {"anyOf": [base, {"type": "null"}]}
        return base

    def ref(self, desc: Descriptor) -> dict[str, Any]:
        if desc.full_name in _WKT:
            return dict(_WKT[desc.full_name])
        name = _schema_name(desc)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            self.schemas[name] = {
                "type": "object",
                "properties": {f.name: self.field_schema(f) for f in desc.fields},
            }
        return {"$ref": f"#/components/schemas/{name}"}


def _param_schema(f: FieldDescriptor, b: _Builder) -> dict[str, Any]:
    s = b.field_schema(f)
    return s.get("anyOf", [s])[0] if "anyOf" in s else s


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
                {"name": name, "in": "path", "required": True, "schema": _param_schema(f, b)}
            )
        if not r.body:
            for f in r.input.fields:
                if f.name in r.path_fields or (
                    f.message_type is not None and f.message_type.full_name not in _WKT
                ):
                    continue
                op["parameters"].append(
                    {"name": f.name, "in": "query", "required": False, "schema": _param_schema(f, b)}
                )
        elif r.body == "*":
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": b.ref(r.input)}},
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
        op["responses"]["default"] = {
            "description": "Error",
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
            "/health": {
                "get": {
                    "operationId": "Edge_Health",
                    "security": [],
                    "responses": {"200": {"description": "healthy"}, "503": {"description": "degraded"}},
                }
            },
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
