"""Pure rules of the instances service: the state machine, specs, quotas, health aggregation,
log levels."""

from __future__ import annotations

import pytest

from libs.errors import InvalidArgument, QuotaExceeded
from services.instances import specs
from services.instances.domain import check_quota
from services.instances.health import aggregate, transition_event, validate_target
from services.instances.providers.swarm import published_ports
from services.instances.telemetry import level_of
from services.instances.tenants import Limits


def test_state_machine_allows_only_the_listed_transitions():
    """Start from stopped/failed, stop from running, destroyed is terminal."""
    assert specs.can_transition("stopped", "starting") and specs.can_transition("running", "stopping")
    assert not specs.can_transition("running", "starting") and not specs.can_transition("stopped", "stopping")
    assert not specs.TRANSITIONS["destroyed"]


def test_create_specs_default_and_validate():
    """`image` makes a single main service with defaults; two mains or duplicates are refused."""
    [main] = specs.services_from_create("img:1", {}, [{"container_port": 80}], {"A": "1"}, [])
    assert main["name"] == "main" and main["resources"]["cpu_millis"] == specs.DEFAULT_CPU_MILLIS
    assert main["ports"] == [{"container_port": 80, "host_port": 0, "protocol": "tcp"}]
    with pytest.raises(InvalidArgument):
        specs.services_from_create("img:1", {}, [], {}, [{"name": "x", "image": "i"}])
    with pytest.raises(InvalidArgument):
        specs.services_from_create("", {}, [], {}, [{"name": "a", "image": "i"}, {"name": "a", "image": "i"}])


def test_deploy_merges_env_and_keeps_unlisted_services():
    base = [
        specs.normalize_service({"name": "main", "image": "a:1", "env": {"X": "1"}}),
        specs.normalize_service({"name": "side", "image": "s:1", "role": "sidecar"}),
    ]
    out = specs.apply_deploy(base, "a:2", {"Y": "2"}, [])
    assert out[0]["image"] == "a:2" and out[0]["env"] == {"X": "1", "Y": "2"} and out[1]["image"] == "s:1"
    assert base[0]["env"] == {"X": "1"}  # the old snapshot is untouched
    with pytest.raises(InvalidArgument):
        specs.apply_deploy(base, "", {}, [{"name": "nope", "image": "x"}])


def test_quota_counts_increases_only():
    lim = Limits("t", "a", "active", 2, 1000, 0, 0)
    check_quota(lim, {"instances": 1, "cpu_millis": 500}, {"instances": 1, "cpu_millis": 500})
    with pytest.raises(QuotaExceeded) as err:
        check_quota(lim, {"instances": 2}, {"instances": 1})
    assert err.value.details["quota"] == "max_instances"
    check_quota(lim, {"instances": 2, "cpu_millis": 2000}, {"cpu_millis": -500})  # shrinking is fine
    check_quota(lim, {"memory_mb": 10**6}, {"memory_mb": 10})  # 0 = no cap


def test_health_aggregate_and_events():
    assert aggregate([]) == "unknown" and aggregate(["unknown"]) == "unknown"
    assert aggregate(["healthy", "healthy"]) == "healthy" and aggregate(["unhealthy"]) == "unhealthy"
    assert aggregate(["healthy", "unknown"]) == "degraded"
    assert transition_event("unknown", "healthy") == "health.passed"
    assert transition_event("unhealthy", "healthy") == "health.recovered"
    assert transition_event("healthy", "healthy") is None


def test_localhost_targets_must_be_instance_ports():
    validate_target("http", "http://localhost:8080/healthz", {8080})
    validate_target("grpc", "127.0.0.1:50051", set())
    with pytest.raises(InvalidArgument):
        validate_target("tcp", "localhost:22", {8080})
    with pytest.raises(InvalidArgument):
        validate_target("http", "ftp://x", {8080})


def test_log_levels_are_inferred():
    assert level_of('{"level":"warning","msg":"x"}')[0] == "warn"
    assert level_of("2024 ERROR boom")[0] == "error"
    assert level_of("plain line")[0] == "info"


def test_a_swarm_task_is_reached_on_the_port_bound_first_not_its_ipv6_twin():
    """A task publishing a port on 0.0.0.0 and on :: lists two host ports; endpoints use the first."""
    status = {
        "PortStatus": {
            "Ports": [
                {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 32810, "PublishMode": "host"},
                {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 32804, "PublishMode": "host"},
                {"Protocol": "tcp", "TargetPort": 9000, "PublishedPort": 0, "PublishMode": "host"},
            ]
        }
    }
    assert published_ports(status) == {80: 32810}
    assert published_ports({}) == {}


def test_the_registry_routes_an_instance_by_its_cluster():
    """Instances of the default cluster (or of none: made before the registry) use the
    configured providers; another cluster's get a provider of their own on that cluster's
    endpoint once it is learned (ProviderUnavailable before); a self_managed cluster runs swarm."""
    from libs.errors import ProviderUnavailable
    from libs.ids import MAIN_CLUSTER_ID
    from libs.settings import Settings
    from services.instances.providers import Registry
    from services.instances.providers.swarm import SwarmProvider

    reg = Registry(Settings(providers="docker,swarm", docker_host="unix:///run/main.sock"))
    # `main` is known without asking the clusters service (its id is fixed).
    assert reg.knows(MAIN_CLUSTER_ID) and reg.on_configured(MAIN_CLUSTER_ID)
    reg.learn("c-main", "unix:///run/main.sock", default=True)
    assert reg.on_configured("") and reg.on_configured("c-main")
    assert reg.cluster_kinds("c-main", "local") == ["docker", "swarm"]
    assert not reg.knows("c-swarm")
    with pytest.raises(ProviderUnavailable):
        reg.get("swarm", "c-swarm")
    reg.learn("c-swarm", "unix:///run/other.sock")
    assert reg.knows("c-swarm") and not reg.on_configured("c-swarm") and reg.has("swarm", "c-swarm")
    assert reg.cluster_kinds("c-swarm", "self_managed") == ["swarm"]
    p = reg.get("swarm", "c-swarm")
    assert isinstance(p, SwarmProvider) and p._url == "unix:///run/other.sock"
    assert reg.get("swarm", "c-swarm") is p
    reg.learn("c-swarm", "unix:///run/moved.sock")  # a new endpoint: a new provider
    moved = reg.get("swarm", "c-swarm")
    assert isinstance(moved, SwarmProvider) and moved._url == "unix:///run/moved.sock"
    # A local cluster registered again with the configured engine is the configured providers'.
    reg.learn("c-again", "unix:///run/main.sock")
    assert reg.on_configured("c-again")


def test_only_a_container_bound_to_the_gateway_socket_gets_it_mounted(tmp_path):
    """The docker provider mounts the gateway's socket directory at /run/ctrlmesh/pg exactly when
    the injected PGHOST names it, and never for a remote engine (a bind mount names a path on
    the engine's host)."""
    from services.instances.providers.base import GroupSpec, Injection
    from services.instances.providers.docker import DockerProvider

    svc = {"name": "main", "image": "img", "resources": {}, "ports": []}

    def mounts(url: str, env: dict[str, str]) -> list[dict[str, object]]:
        p = DockerProvider(url, pull=False, stop_timeout=1, pg_socket_dir=tmp_path)
        g = GroupSpec("inst_x", "ten_x", "rel_x", svc, secrets=Injection(env=env))
        return list(p._config(g, 0)["HostConfig"].get("Mounts", []))

    bound = {"PGHOST": "/run/ctrlmesh/pg", "PGPORT": "6432"}
    assert mounts("unix:///var/run/docker.sock", bound) == [
        {"Type": "bind", "Source": str(tmp_path), "Target": "/run/ctrlmesh/pg"}
    ]
    assert mounts("unix:///var/run/docker.sock", {"PGHOST": "db.example.test"}) == []
    assert mounts("tcp://10.0.0.5:2376", bound) == []
