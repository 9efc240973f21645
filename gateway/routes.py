"""Routes built from the contracts: every `google.api.http` rule of every generated service.

Nothing here names a service or a path: load the descriptors, read the rules, compile each path
template into a matcher. A method without a rule (an internal RPC) gets no route.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from dataclasses import dataclass
from functools import cached_property

import ctrlmesh
from ctrlmesh.common.v1 import common_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

_VAR = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_.]*)\}")

# The edge's own routes, the only ones served without an API key. gateway/README.md, ROUTES.md
# and /openapi.json are checked against this list (tests/unit/test_edge_rules.py).
PUBLIC_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
)


@dataclass
class Route:
    http_method: str
    template: str
    body: str
    response_body: str
    method: MethodDescriptor
    status: int
    empty_status: int

    @cached_property
    def service(self) -> str:
        """The owning process: `ctrlmesh.<service>.v1`."""
        return str(self.method.containing_service.full_name.split(".")[1])

    @cached_property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @cached_property
    def label(self) -> str:
        """`GET /v2/dbs/{db_id}`: the route in metrics, spans and logs."""
        return f"{self.http_method} {self.template}"

    @cached_property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        pattern = _VAR.sub(
            lambda m: f"(?P<{m.group(1).replace('.', '__')}>[^/]+)",
            re.escape(self.template).replace(r"\{", "{").replace(r"\}", "}"),
        )
        return re.compile(f"^{pattern}$")

    @cached_property
    def path_fields(self) -> list[str]:
        return _VAR.findall(self.template)

    @property
    def literal_weight(self) -> tuple[int, int]:
        """More literal segments first, so `/v2/api-keys/me` wins over `/v2/api-keys/{key_id}`."""
        segments = self.template.strip("/").split("/")
        return (-sum(1 for s in segments if "{" not in s), -len(segments))

    @property
    def input(self) -> Descriptor:
        return self.method.input_type

    @property
    def output(self) -> Descriptor:
        return self.method.output_type

    def request_class(self) -> type[Message]:
        return self._classes[0]

    def response_class(self) -> type[Message]:
        return self._classes[1]

    @cached_property
    def _classes(self) -> tuple[type[Message], type[Message]]:
        return (
            message_factory.GetMessageClass(self.method.input_type),
            message_factory.GetMessageClass(self.method.output_type),
        )


def _import_all() -> None:
    for mod in pkgutil.walk_packages(ctrlmesh.__path__, "ctrlmesh."):
        if mod.name.endswith("_pb2"):
            importlib.import_module(mod.name)


def _rule_parts(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return kind.upper(), getattr(rule, kind)


def load_routes() -> list[Route]:
    _import_all()
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if not (name.startswith("ctrlmesh.") and name.endswith("_pb2")):
            continue
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                opts = m.GetOptions()
                if not opts.HasExtension(annotations_pb2.http):
                    continue
                rule = opts.Extensions[annotations_pb2.http]
                verb, path = _rule_parts(rule)
                key = (verb, path)
                if key in seen:
                    raise ValueError(f"route {verb} {path} is declared twice")
                seen.add(key)
                resp = (
                    opts.Extensions[common_pb2.http_response]
                    if opts.HasExtension(common_pb2.http_response)
                    else None
                )
                empty_out = m.output_type.full_name == "google.protobuf.Empty"
                status = resp.status if resp and resp.status else (204 if empty_out else 200)
                routes.append(
                    Route(
                        http_method=verb,
                        template=path,
                        body=rule.body,
                        response_body=rule.response_body,
                        method=m,
                        status=status,
                        empty_status=resp.empty_status if resp else 0,
                    )
                )
    routes.sort(key=lambda r: r.literal_weight)
    return routes


class Router:
    """Matches a path against the templates that can match it at all.

    A variable matches one segment (`[^/]+`), so only templates with as many segments as the
    path, and with its first segment where theirs is literal, are tried: the same first match
    in the same order as trying every template, without a hundred regexes per request."""

    def __init__(self, routes: list[Route]):
        self.routes = routes
        self._by_shape: dict[tuple[int, str], list[Route]] = {}
        self._variable_first: dict[int, list[Route]] = {}
        for r in routes:
            segments = r.template.split("/")
            first = segments[1] if len(segments) > 1 else ""
            if "{" in first:
                self._variable_first.setdefault(len(segments), []).append(r)
            else:
                self._by_shape.setdefault((len(segments), first), []).append(r)
        order = {id(r): i for i, r in enumerate(routes)}
        for key, rs in self._by_shape.items():
            extra = self._variable_first.get(key[0], [])
            self._by_shape[key] = sorted([*rs, *extra], key=lambda r: order[id(r)])

    def candidates(self, path: str) -> list[Route]:
        segments = path.split("/")
        first = segments[1] if len(segments) > 1 else ""
        found = self._by_shape.get((len(segments), first))
        return found if found is not None else self._variable_first.get(len(segments), [])

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """(route, path params, the methods this path is served under: the `Allow` of a 405).

        The methods are those of every template matching the path, so a 405 never hides a
        route that a more literal template of another verb shadows."""
        allowed: set[str] = set()
        found: tuple[Route, dict[str, str]] | None = None
        for r in self.candidates(path):
            m = r.regex.match(path)
            if m is None:
                continue
            allowed.add(r.http_method)
            if found is None and r.http_method == method:
                found = r, {k.replace("__", "."): v for k, v in m.groupdict().items()}
        if found is None:
            return None, {}, sorted(allowed)
        return found[0], found[1], sorted(allowed)
