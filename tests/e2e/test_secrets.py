"""Secrets end to end on a real engine: env and file secrets inside the containers after a
rollout (never before), `?rollout=true` rotating them, a rollback running with its release's
versions, a restart picking up the current ones, no value in any answer or event, and the rules
(400 with the field, 404 across tenants, 429 at max_secrets, ResolveSecrets refused to any
principal but the instances service's)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import grpc
import httpx
import pytest
from ctrlmesh.network.v1 import network_pb2, network_pb2_grpc

from libs.clients import Signer
from libs.events import EVENT_SOURCES, encode_cursor
from libs.principal import Principal, sign
from tests.fixtures.instances import (
    Tenant,
    create_body,
    create_running,
    destroy,
    make_tenant,
    wait_deployment,
    wait_for,
    wait_gone,
    wait_state,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

RUNTIME = "/dev/shm/ctrlmesh-secrets"


class Recorder:
    """A tenant's client that keeps every answer's body, to search them for values."""

    def __init__(self, c: httpx.Client):
        self.c = c
        self.bodies: list[str] = []

    def __getattr__(self, verb: str) -> Any:
        def call(*a: Any, **kw: Any) -> httpx.Response:
            r = getattr(self.c, verb)(*a, **kw)
            self.bodies.append(r.text)
            return r

        return call


def engine(docker_host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args],
        env=dict(os.environ, DOCKER_HOST=docker_host),
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


def containers(docker_host: str, iid: str, release: str) -> list[str]:
    out = engine(
        docker_host,
        "ps",
        "--filter",
        f"label=ctrlmesh.instance={iid}",
        "--filter",
        f"label=ctrlmesh.release={release}",
        "--format",
        "{{.ID}}",
    ).stdout.split()
    assert out, f"no running container of release {release}"
    return out


def inside(docker_host: str, iid: str, release: str) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, /run/secrets files) of every running replica of the release (all equal)."""
    seen = []
    for cid in containers(docker_host, iid, release):
        env = dict(
            line.split("=", 1)
            for line in engine(docker_host, "exec", cid, "env").stdout.splitlines()
            if "=" in line
        )
        files: dict[str, str] = {}
        ls = engine(docker_host, "exec", cid, "ls", "/run/secrets", check=False)
        for name in ls.stdout.split() if ls.returncode == 0 else []:
            files[name] = engine(docker_host, "exec", cid, "cat", f"/run/secrets/{name}").stdout
        env.pop("HOSTNAME", None)  # each container's own
        seen.append((env, files))
    assert all(s == seen[0] for s in seen), seen
    return seen[0]


def set_secret(c: Recorder, iid: str, rollout: bool = False, **body: str) -> dict[str, Any]:
    r = c.post(f"/v1/instances/{iid}/secrets", json=body, params={"rollout": "true"} if rollout else None)
    assert r.status_code == 201, r.text
    return dict(r.json())


def rolled(c: Recorder, iid: str, dep_id: str) -> dict[str, Any]:
    assert dep_id
    assert wait_deployment(c.c, dep_id, ("succeeded", "failed", "cancelled"))["state"] == "succeeded"
    return dict(c.get(f"/v1/instances/{iid}").json())


def test_secrets_reach_containers_at_rollouts_and_rollback_restores_their_versions(
    tenant: Tenant, docker_host
):
    """Set → nothing changes until a rollout; `?rollout=true` injects env (over `env`) and
    read-only files from a tmpfs; rotating and deleting take effect the same way; a rollback
    runs with the versions its release recorded; a restart picks up the current ones."""
    c = Recorder(tenant.client())
    inst = create_running(c.c)
    iid, first = inst["id"], inst["current_release"]
    values = ["secret-greeting-1", "file-token-1", "api-key-1", "secret-greeting-2", "file-token-2"]

    s = set_secret(c, iid, key="GREETING", value=values[0])
    assert (s["key"], s["type"], s["version"]) == ("GREETING", "env", 1) and "value" not in s
    assert set_secret(c, iid, key="token", value=values[1], type="file")["version"] == 1
    env, files = inside(docker_host, iid, first)
    assert env["GREETING"] == "hello" and files == {}, "a set must wait for the next rollout"

    dep = set_secret(c, iid, rollout=True, key="API_KEY", value=values[2])["deployment_id"]
    second = rolled(c, iid, dep)["current_release"]
    env, files = inside(docker_host, iid, second)
    assert (env["GREETING"], env["API_KEY"], files) == (values[0], values[2], {"token": values[1]})
    cid = containers(docker_host, iid, second)[0]
    assert engine(docker_host, "exec", cid, "touch", "/run/secrets/x", check=False).returncode != 0
    mounts = json.loads(engine(docker_host, "inspect", "--format", "{{json .Mounts}}", cid).stdout)
    assert [(m["Destination"], m["RW"], m["Source"].startswith(RUNTIME)) for m in mounts] == [
        ("/run/secrets", False, True)
    ]
    assert c.get(f"/v1/releases/{second}").json()["secret_versions"] == {
        "GREETING": 1,
        "token": 1,
        "API_KEY": 1,
    }

    dep = set_secret(c, iid, rollout=True, key="GREETING", value=values[3])["deployment_id"]
    third = rolled(c, iid, dep)["current_release"]
    assert inside(docker_host, iid, third)[0]["GREETING"] == values[3]

    rb = c.post(f"/v1/instances/{iid}/rollback", json={"release_id": second})
    assert rb.status_code == 201, rb.text
    assert rolled(c, iid, rb.json()["id"])["current_release"] == second
    assert inside(docker_host, iid, second)[0]["GREETING"] == values[0], "rollback runs its release's version"

    assert set_secret(c, iid, key="token", value=values[4])["version"] == 2
    assert c.post(f"/v1/instances/{iid}/restart", json={}).status_code == 204
    wait_for(lambda: c.c.get(f"/v1/instances/{iid}").json(), lambda i: i["state"] == "running", 30)
    wait_for(lambda: files_now(docker_host, iid, second), lambda f: f == {"token": values[4]}, 30)

    r = c.delete(f"/v1/instances/{iid}/secrets/API_KEY", params={"rollout": "true"})
    assert r.status_code == 204, r.text
    dep = [d for d in c.get(f"/v1/instances/{iid}/deployments").json()["items"] if d["state"] != "succeeded"]
    if dep:
        rolled(c, iid, dep[0]["id"])
    last = wait_state(c.c, iid, "running")["current_release"]
    wait_for(lambda: inside(docker_host, iid, last)[0], lambda e: "API_KEY" not in e, 30)

    listed = c.get(f"/v1/instances/{iid}/secrets").json()
    assert [(x["key"], x["version"]) for x in listed["items"]] == [("GREETING", 2), ("token", 2)]
    c.get(f"/v1/instances/{iid}/releases")
    c.get(f"/v1/instances/{iid}/deployments")
    events = secret_events(tenant, iid, want=6)
    assert [(e["type"], e["data"]["key"], e["data"]["version"]) for e in events][:3] == [
        ("secret.set", "GREETING", 1),
        ("secret.set", "token", 1),
        ("secret.set", "API_KEY", 1),
    ] and ("secret.deleted", "API_KEY", 1) in {
        (e["type"], e["data"]["key"], e["data"]["version"]) for e in events
    }
    answers = "\n".join(c.bodies) + json.dumps(events)
    assert not [v for v in values if v in answers], "a secret value appeared in an API answer or event"

    destroy(c.c, docker_host, iid)
    assert not os.path.exists(f"{RUNTIME}/{iid}"), "the tmpfs files outlived the instance"


def secret_events(t: Tenant, iid: str, want: int) -> list[dict[str, Any]]:
    """The tenant's secret.* events of the instance in /v2/events, replayed from the start."""
    seen: list[dict[str, Any]] = []
    headers = {
        "Authorization": f"Bearer {t.key}",
        "Last-Event-ID": encode_cursor(dict.fromkeys(EVENT_SOURCES, 0)),
    }
    with httpx.stream("GET", f"{t.mesh.base_url}/v2/events", headers=headers, timeout=20) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev["type"].startswith("secret.") and ev["data"].get("instance_id") == iid:
                seen.append(ev)
                if len(seen) >= want:
                    break
    return seen


def test_secret_rules_quota_cross_tenant_and_resolve_refused(tenant: Tenant, docker_host):
    """400 naming the field (env key, size, type), 404 for another tenant's instance and a missing
    key, 429 QuotaExceeded at max_secrets (a new version of a key is not a new secret),
    ResolveSecrets refused (403) to every principal but the instances service's, and the secrets
    of a deleted instance deleted with it."""
    mesh = tenant.mesh
    small = make_tenant(
        mesh, {"max_instances": 2, "max_cpu_millis": 4000, "max_memory_mb": 4096, "max_secrets": 2}
    )
    c = small.client()
    inst = create_running(c)
    iid = inst["id"]
    url = f"/v1/instances/{iid}/secrets"
    bad = {
        "bad env key": ({"key": "1-BAD", "value": "x"}, "key"),
        "bad env key, explicit type": ({"key": "a.b", "value": "x", "type": "env"}, "key"),
        "too large": ({"key": "BIG", "value": "x" * 65537}, "secret.value"),
        "unknown type": ({"key": "K", "value": "x", "type": "vault"}, "secret.type"),
        "empty value": ({"key": "K", "value": ""}, "secret.value"),
    }
    for name, (body, field) in bad.items():
        r = c.post(url, json=body)
        assert r.status_code == 400, (name, r.text)
        fields = r.json()["details"]["fields"]
        assert any(k == field or k.startswith(field) for k in fields), (name, fields)
    assert c.post(url, json={"key": "cfg.yaml", "value": "a: 1", "type": "file"}).status_code == 201
    assert c.post(url, json={"key": "ONE", "value": "1"}).status_code == 201
    assert c.post(url, json={"key": "ONE", "value": "2"}).json()["version"] == 2
    r = c.post(url, json={"key": "THREE", "value": "3"})
    assert r.status_code == 429 and r.json()["error"] == "QuotaExceeded", r.text
    assert c.post(url, json={"key": "ONE", "value": "3", "type": "file"}).status_code == 400
    assert c.delete(f"{url}/NOPE").status_code == 404

    other = tenant.client()
    for r in (
        other.post(url, json={"key": "X", "value": "y"}),
        other.get(url),
        other.delete(f"{url}/ONE"),
        c.get("/v1/instances/inst_01h455vb4pex5vsknk084sn02q/secrets"),
    ):
        assert r.status_code == 404 and r.json()["error"] == "NotFound", r.text
    assert mesh.admin().get(url).json()["total"] == 2

    target = mesh.grpc_target("network")
    secret = mesh.internal_secret
    req = network_pb2.ResolveSecretsRequest(tenant_id=small.id, instance_id=iid)
    with grpc.insecure_channel(target) as ch:
        stub = network_pb2_grpc.SecretServiceStub(ch)
        refused = [
            Signer(secret, "databases").system(),
            sign(Principal(key_id="key_x", scope="tenant", tenant_id=small.id), secret),
            sign(Principal(key_id="key_y", scope="global"), secret),
        ]
        for md in refused:
            with pytest.raises(grpc.RpcError) as err:
                stub.ResolveSecrets(req, metadata=md, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        got = stub.ResolveSecrets(req, metadata=Signer(secret, "instances").system(), timeout=5)
        assert {(x.key, x.version, x.value) for x in got.secrets} == {
            ("ONE", 2, "2"),
            ("cfg.yaml", 1, "a: 1"),
        }
    destroy(c, docker_host, iid)
    # A deleted instance's secrets go with it, and so does their share of the quota.
    quota = f"/v1/admin/tenants/{small.id}/quota"
    wait_for(lambda: mesh.admin().get(quota).json()["used"]["secrets"], lambda n: n == 0, 20)


def test_swarm_gets_env_and_swarm_secret_files_and_removes_them_with_the_instance(imesh, docker_host):
    """On `swarm`: env secrets in the task's environment, file secrets as Swarm secrets mounted
    read-only at /run/secrets/<key>; a restart after a change runs the new version; nothing
    (service or Swarm secret) is left after delete."""
    t = make_tenant(imesh)
    c = Recorder(t.client())
    r = c.post("/v1/instances", json=create_body(provider_name="swarm"))
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    wait_state(c.c, iid, "running", timeout=60)
    set_secret(c, iid, key="GREETING", value="swarm-secret-1")
    dep = set_secret(c, iid, rollout=True, key="conf", value="swarm-file-1", type="file")["deployment_id"]
    rel = rolled(c, iid, dep)["current_release"]
    env, files = inside(docker_host, iid, rel)
    assert (env["GREETING"], files) == ("swarm-secret-1", {"conf": "swarm-file-1"})
    cid = containers(docker_host, iid, rel)[0]
    assert (
        engine(docker_host, "exec", cid, "sh", "-c", "echo x > /run/secrets/conf", check=False).returncode
        != 0
    )
    set_secret(c, iid, key="conf", value="swarm-file-2")
    assert c.post(f"/v1/instances/{iid}/restart", json={}).status_code == 204
    wait_for(lambda: files_now(docker_host, iid, rel), lambda f: f == {"conf": "swarm-file-2"}, 60)
    assert c.delete(f"/v1/instances/{iid}").status_code == 202
    wait_gone(c.c, iid, timeout=60)
    left = engine(
        docker_host, "secret", "ls", "--filter", f"label=ctrlmesh.instance={iid}", "-q"
    ).stdout.split()
    assert left == [], "swarm secrets outlived the instance"
    assert not [v for v in ("swarm-secret-1", "swarm-file-1", "swarm-file-2") if v in "\n".join(c.bodies)]


def files_now(docker_host: str, iid: str, release: str) -> dict[str, str] | None:
    """The replicas' /run/secrets files, or None while they are being replaced."""
    try:
        return inside(docker_host, iid, release)[1]
    except (AssertionError, subprocess.CalledProcessError):
        return None
