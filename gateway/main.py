"""The edge process: `python -m gateway.main` serves HTTP/JSON on CTRLMESH_HTTP_PORT."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from libs import keys
from libs.clients import Channels, Signer
from libs.settings import Settings
from libs.telemetry import setup_logging, setup_tracing


def main() -> None:
    settings = Settings.load()
    setup_logging(settings.log_level)
    setup_tracing("ctrlmesh-edge", settings.trace_sample_ratio)
    channels = Channels(settings)
    app = create_app(settings, channels, Signer(keys.internal_secret(settings), "edge"))
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        loop=settings.event_loop,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
