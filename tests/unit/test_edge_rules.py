"""The edge's transcoding rules (gateway/README.md), checked one by one on real contracts."""

import json
import re
from pathlib import Path

import pytest
from ctrlmesh.accounts.v1 import accounts_pb2 as pb
from openapi_spec_validator import validate

from gateway.openapi import build_openapi
from gateway.routes import Router, load_routes
from gateway.transcode import build_request, to_json
from libs.errors import InvalidArgument

_REPO = Path(__file__).resolve().parents[2]
# The shared ROUTES.md beside the repository is the source of truth; docs/ROUTES.md is the copy
# the repository carries for clones that have no shared/ beside them.
ROUTES_MD = next(
    p for p in (_REPO.parent / "shared" / "ROUTES.md", _REPO / "docs" / "ROUTES.md") if p.exists()
)


def routes_md() -> set[tuple[str, str]]:
    """Every (method, path) ROUTES.md lists, with `{param}` names normalised to `{}`.

    Rows are `| METHOD[/METHOD] | /path[, /suffix] | … |` (SPG99, Zectre) or
    `| Area | METHOD /path · /suffix · METHOD/METHOD /path … |` (Ctrl Plane); a bare `/suffix`
    continues the previous path's parent with the previous verbs.
    """
    found: set[tuple[str, str]] = set()
    verb_re = r"(?:GET|POST|PUT|PATCH|DELETE)(?:/(?:GET|POST|PUT|PATCH|DELETE))*"
    for line in ROUTES_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        if re.fullmatch(verb_re, cells[0]):
            entries = [
                f"{cells[0]} {e}" if i == 0 else e for i, e in enumerate(re.split(r" · |, ", cells[1]))
            ]
        else:
            entries = re.split(r" · ", cells[1])
        verbs: list[str] = []
        base = ""
        for raw in entries:
            entry = re.sub(r"\s*\(.*?\)", "", raw).strip()
            m = re.fullmatch(rf"(?:({verb_re}) )?(/\S+)", entry)
            if not m:
                continue
            if m.group(1):
                verbs = m.group(1).split("/")
            path = m.group(2)
            if path.startswith(("/v1/", "/v2/", "/api/")):
                base = path.rsplit("/", 1)[0]
            elif base:
                path = base + path
            else:
                continue
            for v in verbs:
                found.add((v, path))
    return {(v, re.sub(r"\{[^}]+\}", "{}", p)) for v, p in found if p.startswith(("/v1/", "/v2/", "/api/"))}


def test_every_route_in_routes_md_is_served_exactly_once():
    """The annotations cover ROUTES.md: no route is missing or hand-written elsewhere."""
    served = [(r.http_method, re.sub(r"\{[^}]+\}", "{}", r.template)) for r in load_routes()]
    assert len(served) == len(set(served))
    missing = routes_md() - set(served)
    assert not missing, sorted(missing)
    assert len(routes_md()) >= 90


def test_openapi_is_valid_3_1_and_lists_every_route():
    """/openapi.json is generated from the same descriptors and passes a real validator."""
    routes = load_routes()
    doc = build_openapi(routes, "0.1.0")
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    listed = {
        (verb.upper(), re.sub(r"\{[^}]+\}", "{}", p)) for p, ops in doc["paths"].items() for verb in ops
    }
    assert routes_md() <= listed


def test_literal_segments_win_over_variables():
    """`GET /v2/api-keys/me` is not taken for a key id, and a wrong verb is a 405 hint."""
    router = Router(load_routes())
    route, params, _ = router.match("GET", "/v2/api-keys/me")
    assert route is not None and route.method.name == "GetCurrentApiKey" and params == {}
    route, params, _ = router.match("DELETE", "/v2/api-keys/key_1")
    assert route is not None and params == {"key_id": "key_1"}
    route, _, exists = router.match("PUT", "/v2/api-keys/key_1")
    assert route is None and exists


def test_path_and_query_fill_fields_with_type_conversion():
    """Path variables and query parameters become typed request fields."""
    msg = build_request(
        pb.DeleteTenantRequest,
        body_field="",
        body=None,
        path_params={"tenant": "acme"},
        query=[("cascade", "true")],
    )
    assert msg.tenant == "acme" and msg.cascade is True
    msg = build_request(
        pb.QueryAuditLogRequest,
        body_field="",
        body=None,
        path_params={},
        query=[("limit", "5"), ("since", "2026-01-01T00:00:00Z")],
    )
    assert msg.limit == 5 and msg.since.seconds > 0


@pytest.mark.parametrize(
    ("query", "field"),
    [([("limit", "ten")], "limit"), ([("nope", "1")], "nope"), ([("limit", "1"), ("limit", "2")], "limit")],
)
def test_bad_query_parameters_name_the_failing_field(query, field):
    """A malformed, unknown or repeated query parameter is a 400 naming the field."""
    with pytest.raises(InvalidArgument) as err:
        build_request(pb.ListTenantsRequest, body_field="", body=None, path_params={}, query=query)
    assert field in err.value.fields


def test_body_is_strict_and_body_routes_take_no_query():
    """Unknown body fields and query parameters on `body: "*"` routes are refused."""
    with pytest.raises(InvalidArgument):
        build_request(
            pb.CreateTenantRequest, body_field="*", body={"name": "a", "bogus": 1}, path_params={}, query=[]
        )
    with pytest.raises(InvalidArgument):
        build_request(
            pb.CreateTenantRequest, body_field="*", body={"name": "a"}, path_params={}, query=[("name", "b")]
        )
    with pytest.raises(InvalidArgument):
        build_request(
            pb.CreateTenantRequest, body_field="*", body=["not", "an", "object"], path_params={}, query=[]
        )


def test_body_field_routes_put_the_body_into_that_field():
    """`body: "quota"` parses the JSON into the quota field; the id comes from the path."""
    msg = build_request(
        pb.SetQuotaRequest,
        body_field="quota",
        body={"max_instances": 3},
        path_params={"id": "ten_1"},
        query=[],
    )
    assert msg.id == "ten_1" and msg.quota.max_instances == 3


def test_responses_show_every_field_nulls_and_numbers():
    """Unset message/optional fields are null, 64-bit ints are numbers, snake_case names."""
    out = to_json(pb.ApiKey(id="key_1", scope="global"))
    assert out["key"] is None and out["expires_at"] is None and out["tenant"] == ""
    limits = to_json(pb.PlanLimits(max_egress_bytes=5 * 1024**3))
    assert limits["max_egress_bytes"] == 5 * 1024**3 and isinstance(limits["max_egress_bytes"], int)


def test_response_body_selects_one_field():
    """`response_body` answers with one field (Zectre's plain arrays, a deleted tenant)."""
    resp = pb.DeleteTenantResponse(tenant=pb.Tenant(id="ten_1", status="deleting"))
    assert to_json(resp, "tenant")["status"] == "deleting"


def test_grpc_message_size_errors_are_never_quota_exceeded():
    """gRPC's own RESOURCE_EXHAUSTED (no ErrorInfo) is 413 PayloadTooLarge or 503, never 429."""
    import grpc

    from gateway.errors import from_rpc_error

    def raw(details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), details
        )

    status, body = from_rpc_error(raw("Received message larger than max (5242893 vs. 4194304)"), "accounts")
    assert status == 413 and body["error"] == "PayloadTooLarge" and "4194304" not in body["message"]
    status, body = from_rpc_error(raw("Too many pending RPCs"), "accounts")
    assert status == 503 and body["error"] == "Unavailable"


def test_the_405_allow_list_comes_from_every_matching_template():
    """`Allow` lists each verb a path is served under, also across literal and variable templates."""
    router = Router(load_routes())
    assert router.match("PUT", "/v2/tenants")[2] == ["GET", "POST"]
    assert router.match("POST", "/v2/api-keys/me")[2] == ["DELETE", "GET"]
    assert router.match("GET", "/nothing")[2] == []


def test_json_depth_and_text_checks_name_the_field():
    """Depth beyond 64 is refused without recursion; a lone surrogate names its (nested) field."""
    from gateway.app import MAX_JSON_DEPTH, check_json

    deep: list = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    with pytest.raises(InvalidArgument) as err:
        check_json(deep)
    assert err.value.fields == {"body": "nested too deep"}
    ok: dict = {}
    node2 = ok
    for _ in range(MAX_JSON_DEPTH - 1):
        node2["a"] = {}
        node2 = node2["a"]
    check_json(ok)
    with pytest.raises(InvalidArgument) as err:
        check_json({"resources": {"name": "x\ud800"}})
    assert "resources.name" in err.value.fields


def test_settings_defaults_for_the_edge_limits():
    """The body limit and the per-route default deadlines have the documented defaults."""
    from libs.settings import Settings

    s = Settings()
    assert s.max_body_bytes == 1024 * 1024
    assert s.read_deadline.total_seconds() == 5 and s.write_deadline.total_seconds() == 15


def test_openapi_carries_the_protovalidate_rules():
    """Required fields, lengths, patterns, enums, ranges and formats come from `buf.validate`,
    for every field that has such a rule: the contract says what the server refuses."""
    from buf.validate import validate_pb2

    from gateway.openapi import required_fields

    doc = build_openapi(load_routes(), "0.1.0")
    schemas = doc["components"]["schemas"]
    tenant = schemas["accounts_v1_CreateTenantRequest"]
    assert tenant["required"] == ["name"]
    assert tenant["properties"]["name"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[A-Za-z_][A-Za-z0-9_$]*$",
    }
    key = schemas["accounts_v1_CreateApiKeyRequest"]
    assert key["properties"]["scope"]["enum"] == ["global", "account", "tenant"]
    assert "tenant is required when scope is tenant" in key["description"]
    text = json.dumps(doc)
    assert '"format": "uuid"' in text and '"format": "email"' in text and '"maximum": 65535' in text
    # Every rule-bearing scalar field of every schema shows its rule.
    pool = {r.input.full_name: r.input for r in load_routes()}
    checked = 0
    for full_name, desc in pool.items():
        name = full_name.removeprefix("ctrlmesh.").replace(".", "_")
        if name not in schemas:
            continue
        for f in desc.fields:
            opts = f.GetOptions()
            if not opts.HasExtension(validate_pb2.field):
                continue
            kind = opts.Extensions[validate_pb2.field].WhichOneof("type")
            if kind in ("string", "int32", "int64", "repeated", "map"):
                rendered = json.dumps(schemas[name]["properties"][f.name])
                assert any(
                    k in rendered
                    for k in (
                        "Length",
                        "pattern",
                        "enum",
                        "format",
                        "minimum",
                        "maximum",
                        "Items",
                        "Properties",
                    )
                ), (name, f.name, rendered)
                checked += 1
        assert schemas[name].get("required", []) == required_fields(desc)
    # A floor, so the loop cannot pass by checking nothing (query-only inputs have no schema).
    assert checked > 90
    # Path fields are not asked for again in the body of a `body: "*"` route.
    scale = doc["paths"]["/v1/instances/{id}/scale"]["post"]["requestBody"]["content"]["application/json"]
    assert "id" not in schemas[scale["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]


def _unauthenticated_in(text: str) -> set[tuple[str, str]]:
    """The `METHOD /path` pairs of the sentence "... every route except `GET /a`, `GET /b` ..."."""
    flat = " ".join(text.split())
    sentence = flat.split("every route except", 1)[1].split(";", 1)[0]
    return {(m, p) for m, p in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", sentence)}


def test_one_list_of_unauthenticated_routes():
    """PUBLIC_ROUTES in code is the list gateway/README.md, ROUTES.md (and its copy in docs/)
    and /openapi.json (`security: []`) give; every other operation needs the bearer key."""
    from gateway.routes import PUBLIC_ROUTES

    public = set(PUBLIC_ROUTES)
    assert _unauthenticated_in((_REPO / "gateway" / "README.md").read_text()) == public
    for routes_md_file in {ROUTES_MD, _REPO / "docs" / "ROUTES.md"}:
        assert _unauthenticated_in(routes_md_file.read_text()) == public, routes_md_file
    doc = build_openapi(load_routes(), "0.1.0")
    open_ops = {
        (verb.upper(), path)
        for path, ops in doc["paths"].items()
        for verb, op in ops.items()
        if op.get("security") == []
    }
    assert open_ops == public and doc["security"] == [{"bearer": []}]


def test_nul_is_refused_in_every_string_field_naming_it():
    """The validation step finds a NUL in nested, repeated and map fields, keys and values."""
    from ctrlmesh.instances.v1 import instances_pb2 as ipb

    from libs.interceptors import violations as _violations

    msg = ipb.CreateInstanceRequest(name="ok", image="img")
    msg.env["A\x00"] = "v"
    msg.labels["k"] = "v\x00"
    msg.services.add(name="web\x00", image="img")
    found = _violations(msg)
    assert set(found) == {"env['A\\x00']", "labels['k']", "services[0].name"}
    assert set(found.values()) == {"must not contain a NUL character"}
    assert "name" not in _violations(ipb.CreateInstanceRequest(name="ok", image="img"))
