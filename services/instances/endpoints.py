"""Where an instance answers, from the replicas its engine reports."""

from __future__ import annotations

from typing import Any

from services.instances.providers.base import Replica
from services.instances.repository import Instance


def endpoints_of(instance: Instance, replicas: list[Replica]) -> list[dict[str, Any]]:
    """Where the current release answers: one endpoint per published port of each replica."""
    out = []
    by_name = {s["name"]: s for s in instance.spec["services"]}
    for r in replicas:
        if not r.running or r.release_id != instance.current_release or r.service not in by_name:
            continue
        for p in by_name[r.service]["ports"]:
            host = r.ports.get(p["container_port"])
            if not host:
                continue
            proto = p.get("protocol") or "tcp"
            scheme = {"udp": "udp", "grpc": "grpc"}.get(proto, "http")
            out.append(
                {
                    "service_name": r.service,
                    "url": f"{scheme}://127.0.0.1:{host}",
                    "port": host,
                    "protocol": proto,
                    "public": True,
                    "container_port": p["container_port"],
                }
            )
    return out
