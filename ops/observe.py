"""`make observe`: a real Prometheus scraping the mesh that `make run` runs, on loopback.

It reads the same CTRLMESH_* settings as the launcher (so the same data directory and ports),
writes `<data_dir>/prometheus/prometheus.yml` (ops.prometheus) with the alert rules of
ops/rules/, starts Debian's `prometheus` (installed by scripts/install-system-deps.sh when
missing) with its time series under `<data_dir>/prometheus/data`, waits until it is ready and
prints its URL. Ctrl-C or SIGTERM stops it. Grafana is the viewer: import ops/grafana/*.json.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from libs.settings import Settings
from ops import prometheus

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("ctrlmesh.ops.observe")


def ensure_installed() -> str:
    """The prometheus binary, installed from Debian's archive first when it is missing."""
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh"), "prometheus"], check=True)
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed (scripts/install-system-deps.sh prometheus)")
    return binary


def start(
    config: Path, data: Path, host: str, port: int, *, binary: str = "prometheus"
) -> subprocess.Popen[bytes]:
    """Prometheus on host:port with `config`, keeping its time series in `data`."""
    data.mkdir(parents=True, exist_ok=True)
    log_file = (data.parent / "prometheus.log").open("ab")
    try:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address={host}:{port}",
                "--storage.tsdb.retention.time=7d",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    finally:
        log_file.close()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {proc.returncode} (see prometheus.log)")
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"prometheus at {url} was not ready within {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def main() -> None:
    logging.basicConfig(level="INFO", format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its per-request lines are not for operators
    settings = Settings.load()
    binary = ensure_installed()
    config = prometheus.write(settings)
    home = config.parent
    host = "127.0.0.1"
    url = f"http://{host}:{settings.prometheus_port}"
    edge = f"http://{settings.http_host}:{settings.http_port}/health"
    try:
        httpx.get(edge, timeout=1)
    except httpx.HTTPError:
        _say(
            f"note: the mesh does not answer at {edge} (start it with `make run`); its targets read down until it does"
        )
    proc = start(config, home / "data", host, settings.prometheus_port, binary=binary)
    stopping = {"sig": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["sig"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_ready(url, proc)
        jobs = prometheus.targets(settings)
        _say("Prometheus is up")
        _say(f"  URL:         {url}   (targets: {url}/targets, alerts: {url}/alerts)")
        _say(
            f"  scraping:    {sum(len(t) for t in jobs.values())} targets in {len(jobs)} jobs, every "
            f"{settings.prometheus_scrape_interval.total_seconds():g} s"
        )
        _say(f"  config:      {config}")
        _say(f"  data:        {home / 'data'}   (log: {home / 'prometheus.log'})")
        _say(f"  dashboards:  import {ROOT / 'ops' / 'grafana'}/*.json into Grafana, data source {url}")
        _say("Press Ctrl-C to stop.")
        while not stopping["sig"] and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None and not stopping["sig"]:
            _say(f"prometheus exited with code {proc.returncode} (see {home / 'prometheus.log'})")
            sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(proc)
        _say("Prometheus stopped")


if __name__ == "__main__":
    main()
