"""Shared fixtures come in as plugins; the `docker` marker is put on every test that uses an
engine, so `-m "not docker"` runs the rest on a machine without one; a failing test that used a
mesh gets the tail of that mesh's log (every service's output) in its report."""

from collections.abc import Iterator

import pytest

MESH_LOG_TAIL = 150

pytest_plugins = [
    "tests.fixtures.mesh",
    "tests.fixtures.postgres",
    "tests.fixtures.docker",
    "tests.fixtures.instances",
    "tests.fixtures.dns",
    "tests.fixtures.acme",
    "tests.fixtures.caddy",
    "tests.fixtures.swarm",
]


_DOCKER_FIXTURES = frozenset(("docker_host", "imesh", "tenant", "running_instance", "swarm2"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    from tests.fixtures.mesh import Mesh  # imported here: the plugin must be loaded (rewritten) first

    for name, value in getattr(item, "funcargs", {}).items():
        mesh = value if isinstance(value, Mesh) else getattr(value, "mesh", None)
        if isinstance(mesh, Mesh) and mesh.log_path is not None and mesh.log_path.exists():
            lines = mesh.log_path.read_text(errors="replace").splitlines()[-MESH_LOG_TAIL:]
            report.sections.append((f"mesh log of {name} ({mesh.log_path})", "\n".join(lines)))
