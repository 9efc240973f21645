"""Shared fixtures come in as plugins; the `docker` marker is put on every test that uses an
engine, so `-m "not docker"` runs the rest on a machine without one."""

import pytest

pytest_plugins = [
    "tests.fixtures.mesh",
    "tests.fixtures.postgres",
    "tests.fixtures.docker",
    "tests.fixtures.instances",
]


_DOCKER_FIXTURES = frozenset(("docker_host", "imesh", "tenant", "running_instance"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)
