"""The provider registry logs a provider's state once and again only when it changes, not on
every probe (probes run every few seconds)."""

import logging
import tempfile
from pathlib import Path

import pytest

from libs.settings import Settings
from services.instances.providers import Registry
from services.instances.providers.base import ProviderError

pytestmark = pytest.mark.integration

LOGGER = "ctrlmesh.instances.providers"


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_an_absent_engine_is_logged_once_and_again_when_it_answers(caplog, docker_host):
    """A real Docker provider pointed at a socket that is not there yet: five probes, one
    "not registered" line; the socket appears (the real engine): one "registered" line, and
    further probes add nothing."""
    assert docker_host.startswith("unix://")
    link = Path(tempfile.mkdtemp(prefix="ctrlmesh-sock-")) / "docker.sock"
    registry = Registry(Settings(providers="docker", docker_host=f"unix://{link}", docker_pull=False))
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        for _ in range(5):
            health = await registry.probe()
            assert health["docker"].healthy is False
        assert [m for m in _lines(caplog) if "not registered" in m] and len(_lines(caplog)) == 1
        link.symlink_to(docker_host.removeprefix("unix://"))
        for _ in range(3):
            assert (await registry.probe())["docker"].healthy is True
        assert _lines(caplog)[1:] == ["provider docker registered"]
    finally:
        await registry.close()
        link.unlink(missing_ok=True)
        link.parent.rmdir()


class Flapping:
    """A provider whose engine answers or not as the test says (only ping is used here)."""

    name = "docker"

    def __init__(self) -> None:
        self.error: str | None = None

    async def ping(self) -> None:
        if self.error:
            raise ProviderError(self.error)

    async def close(self) -> None:
        pass


async def test_a_registered_provider_that_stops_answering_is_logged_at_each_change(caplog):
    """up, up, down, down, down (other message), up, up: registered; does not answer (once per
    distinct reason); answers again; nothing for the repeats."""
    fake = Flapping()
    registry = Registry(Settings(providers="docker"), candidates={"docker": fake})  # type: ignore[dict-item]
    caplog.set_level(logging.INFO, logger=LOGGER)
    for error in (None, None, "refused", "refused", "timed out", None, None):
        fake.error = error
        await registry.probe()
    assert _lines(caplog) == [
        "provider docker registered",
        "provider docker does not answer: refused",
        "provider docker does not answer: timed out",
        "provider docker answers again",
    ]
    assert registry.names == ["docker"]
