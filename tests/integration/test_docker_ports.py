"""The Docker provider against the real engine: a published port the engine picks but finds taken.

The engine picks a container's published port from the kernel's ephemeral range, the same range
outgoing connections on this host draw their local ports from, and walks that range in order.
It tries five ports on one start; when all five are held by connections (a busy host: CI saw it),
the start fails with "address already in use". The provider starts the container again, and the
engine walks on.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from services.instances.providers.base import GroupSpec
from services.instances.providers.docker import PORT_RETRIES, DockerProvider

pytestmark = [pytest.mark.integration, pytest.mark.docker]

# Ports the engine itself tries on one start before it gives up (dockerd 28 logs "retry: 1..4").
ENGINE_TRIES = 5


def _group(instance_id: str) -> GroupSpec:
    service = {
        "name": "main",
        "image": "ctrlmesh-test/httpd:v1",
        "resources": {"cpu_millis": 50, "memory_mb": 32},
        "ports": [{"container_port": 8080, "protocol": "tcp"}],
    }
    return GroupSpec(instance_id=instance_id, tenant_id="ten_test", release_id="rel_test", service=service)


def _hold(port: int, listener: socket.socket) -> socket.socket | None:
    """An outgoing connection whose local end is 127.0.0.1:port, as the kernel hands out to any
    client on this host (a listening socket on the port the engine sees and skips; this not)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        s.connect(listener.getsockname())
    except OSError:
        s.close()
        return None  # already held by someone else: taken either way
    return s


async def test_a_taken_published_port_is_skipped_and_the_replica_starts(docker_host):
    provider = DockerProvider(docker_host, pull=False, stop_timeout=0)
    probe, target = f"inst_probe{uuid.uuid4().hex[:8]}", f"inst_ports{uuid.uuid4().hex[:8]}"
    held: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        # Learn where the engine's walk through the range stands.
        await provider.scale_group(_group(probe), 1)
        (first,) = await provider.replicas(probe)
        last = first.ports[8080]
        await provider.remove_all(probe)

        # Take the next ports: more than the engine tries on one start (five), fewer than it
        # tries on the provider's starts.
        taken = list(range(last + 1, last + 1 + ENGINE_TRIES * 2 + 2))
        assert len(taken) < ENGINE_TRIES * (PORT_RETRIES + 1)
        held = [s for s in (_hold(p, listener) for p in taken) if s is not None]

        await provider.scale_group(_group(target), 1)
        (replica,) = await provider.replicas(target)
        assert replica.state == "running"
        assert replica.ports[8080] not in taken
        assert replica.ports[8080] > last
    finally:
        for s in held:
            s.close()
        listener.close()
        await provider.remove_all(probe)
        await provider.remove_all(target)
        await provider.close()
