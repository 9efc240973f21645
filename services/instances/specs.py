"""Instance specs as plain data: the services an instance runs, with defaults applied.

A service spec is a dict shaped like the proto's ServiceSpec (`name`, `image`, `role`,
`resources{cpu_millis,memory_mb,disk_mb}`, `env`, `ports[{container_port,host_port,protocol}]`,
`command`, `args`); the same dict is stored in the instance row, in release snapshots and handed
to providers, so nothing is lost between them.
"""

from __future__ import annotations

from typing import Any

from libs import names
from libs.errors import InvalidArgument

DEFAULT_CPU_MILLIS = 500
DEFAULT_MEMORY_MB = 256
MAIN = "main"

STATES = ("provisioning", "starting", "running", "stopping", "stopped", "failed", "destroying", "destroyed")
# The instance state machine (ctrlplane's instance/state.go); anything else is InvalidState.
TRANSITIONS: dict[str, frozenset[str]] = {
    "provisioning": frozenset({"starting", "failed", "destroying"}),
    "starting": frozenset({"running", "failed", "destroying"}),
    "running": frozenset({"stopping", "failed", "destroying"}),
    "stopping": frozenset({"stopped", "failed", "destroying"}),
    "stopped": frozenset({"starting", "destroying"}),
    "failed": frozenset({"starting", "destroying"}),
    "destroying": frozenset({"destroyed", "failed"}),
    "destroyed": frozenset(),
}


def can_transition(src: str, dst: str) -> bool:
    return dst in TRANSITIONS.get(src, frozenset())


def slugify(name: str) -> str:
    return names.slugify(name, "instance")


def normalize_service(raw: dict[str, Any], *, default_name: str = MAIN) -> dict[str, Any]:
    res = dict(raw.get("resources") or {})
    ports = [
        {
            "container_port": int(p["container_port"]),
            "host_port": int(p.get("host_port") or 0),
            "protocol": p.get("protocol") or "tcp",
        }
        for p in raw.get("ports") or []
    ]
    return {
        "name": raw.get("name") or default_name,
        "image": raw.get("image", ""),
        "role": raw.get("role") or MAIN,
        "resources": {
            "cpu_millis": int(res.get("cpu_millis") or DEFAULT_CPU_MILLIS),
            "memory_mb": int(res.get("memory_mb") or DEFAULT_MEMORY_MB),
            "disk_mb": int(res.get("disk_mb") or 0),
        },
        "env": dict(raw.get("env") or {}),
        "ports": ports,
        "command": list(raw.get("command") or []),
        "args": list(raw.get("args") or []),
    }


def services_from_create(
    image: str,
    resources: dict[str, Any],
    ports: list[dict[str, Any]],
    env: dict[str, str],
    services: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """`image` (+ resources, ports, env) is a one-service instance named "main"; `services` is the
    multi-service form. Both given: the top-level fields describe the main service."""
    out = [normalize_service(s) for s in services]
    if image:
        main = normalize_service(
            {"name": MAIN, "image": image, "resources": resources, "ports": ports, "env": env}
        )
        existing = [s for s in out if s["role"] == MAIN]
        if existing:
            raise InvalidArgument(
                "image and a main service in services are both given",
                fields={"image": "give either image or a main service in services"},
            )
        out.insert(0, main)
    validate_services(out)
    return out


def validate_services(services: list[dict[str, Any]]) -> None:
    names = [s["name"] for s in services]
    if len(set(names)) != len(names):
        raise InvalidArgument("service names must be unique", fields={"services": "duplicate service name"})
    mains = [s for s in services if s["role"] == MAIN]
    if len(mains) != 1:
        raise InvalidArgument(
            "exactly one service must have the main role", fields={"services": "one main service"}
        )
    for i, s in enumerate(services):
        if not s["image"]:
            raise InvalidArgument("every service needs an image", fields={f"services[{i}].image": "required"})


def main_service(services: list[dict[str, Any]]) -> dict[str, Any]:
    for s in services:
        if s["role"] == MAIN:
            return s
    return services[0]


def long_running(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Init containers run to completion and hold no capacity; the rest count and run replicas."""
    return [s for s in services if s["role"] != "init"]


def per_replica(services: list[dict[str, Any]]) -> dict[str, int]:
    """What one replica of the instance takes (the quota columns)."""
    live = long_running(services)
    return {
        "cpu_millis": sum(s["resources"]["cpu_millis"] for s in live),
        "memory_mb": sum(s["resources"]["memory_mb"] for s in live),
        "disk_mb": sum(s["resources"]["disk_mb"] for s in live),
    }


def apply_deploy(
    services: list[dict[str, Any]], image: str, env: dict[str, str], changes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The next release's services: `image`/`env` change the main service (env merged over the
    current one), `changes` change named services; unlisted services keep what they run."""
    out = [dict(s, env=dict(s["env"])) for s in services]
    by_name = {s["name"]: s for s in out}
    main = main_service(out)
    if image:
        main["image"] = image
    if env:
        main["env"].update(env)
    for c in changes:
        target = by_name.get(c["name"])
        if target is None:
            raise InvalidArgument(
                f"the instance has no service {c['name']!r}", fields={"services": "unknown service"}
            )
        if c.get("image"):
            target["image"] = c["image"]
        if c.get("env"):
            target["env"].update(c["env"])
    return out
