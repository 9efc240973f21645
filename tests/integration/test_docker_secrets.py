"""The Docker provider's secrets against the real engine: a registry secret authenticates the
pull of a private image (X-Registry-Auth), and file secrets are served from a tmpfs directory
that goes with the group.

The registry is a minimal Docker Registry HTTP API v2 (basic auth, one image: the test image
exported with `docker save`), served here on loopback; the engine pulls from it over plain HTTP,
as it does for any 127.0.0.0/8 registry.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.instances.providers.base import GroupSpec, ImageNotFound, Injection, ProviderError
from services.instances.providers.docker import DockerProvider

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.timeout(90)]

USER, PASSWORD = "puller", "registry-pa55-" + uuid.uuid4().hex[:8]
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blobs(docker_host: str) -> tuple[bytes, dict[str, bytes]]:
    """(manifest, blobs by digest) of the test image, from `docker save`."""
    saved = subprocess.run(
        ["docker", "save", "ctrlmesh-test/httpd:v1"],
        env=dict(os.environ, DOCKER_HOST=docker_host),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        [entry] = json.loads(read("manifest.json"))
        config = read(entry["Config"])
        layers = [gzip.compress(read(name), compresslevel=1) for name in entry["Layers"]]
    blobs = {_digest(config): config, **{_digest(layer): layer for layer in layers}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": _digest(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": len(x),
                "digest": _digest(x),
            }
            for x in layers
        ],
    }
    return json.dumps(manifest).encode(), blobs


@pytest.fixture(scope="module")
def registry(docker_host: str) -> Iterator[str]:
    """host:port of a registry that serves `private/httpd:v1` to USER:PASSWORD only."""
    manifest, blobs = _blobs(docker_host)
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(
            self, code: int, body: bytes = b"", ctype: str = "application/json", **headers: str
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self._answer(
                    401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', WWW_Authenticate='Basic realm="test"'
                )
            elif self.path == "/v2/":
                self._answer(200, b"{}")
            elif self.path == "/v2/private/httpd/manifests/v1" or self.path.endswith(_digest(manifest)):
                self._answer(200, manifest, MANIFEST, Docker_Content_Digest=_digest(manifest))
            elif "/v2/private/httpd/blobs/" in self.path and self.path.rsplit("/", 1)[1] in blobs:
                self._answer(200, blobs[self.path.rsplit("/", 1)[1]], "application/octet-stream")
            else:
                self._answer(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _group(instance_id: str, image: str, secrets: Injection) -> GroupSpec:
    service = {"name": "main", "image": image, "resources": {"cpu_millis": 50, "memory_mb": 32}, "ports": []}
    return GroupSpec(instance_id, "ten_test", "rel_test0001", service, secrets=secrets)


def _untag(docker_host: str, image: str) -> None:
    subprocess.run(
        ["docker", "rmi", "-f", image], env=dict(os.environ, DOCKER_HOST=docker_host), capture_output=True
    )


async def test_a_registry_secret_authenticates_the_pull(docker_host: str, registry: str) -> None:
    """Without credentials the engine's pull is refused; with the registry secret's credentials
    (sent as X-Registry-Auth) the private image is pulled and the replica runs."""
    image = f"{registry}/private/httpd:v1"
    _untag(docker_host, image)
    provider = DockerProvider(docker_host, pull=True, stop_timeout=0)
    iid = f"inst_reg{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(ImageNotFound):
            await provider.scale_group(_group(iid, image, Injection()), 1)
        auth = {"username": USER, "password": PASSWORD, "serveraddress": registry}
        wrong = {**auth, "password": "nope"}
        with pytest.raises(ImageNotFound):
            await provider.scale_group(_group(iid, image, Injection(registry_auth=(wrong,))), 1)
        await provider.scale_group(_group(iid, image, Injection(registry_auth=(auth,))), 1)
        [replica] = await provider.replicas(iid)
        assert replica.state == "running"
    finally:
        await provider.remove_all(iid)
        await provider.close()
        _untag(docker_host, image)


async def test_file_secrets_live_on_a_tmpfs_and_go_with_the_group(docker_host: str, tmp_path: Path) -> None:
    """The provider refuses a secrets directory that is not a tmpfs (the files would reach the
    disk); on /dev/shm it writes them read-only for the container and removes them with it."""
    iid = f"inst_files{uuid.uuid4().hex[:8]}"
    secrets = Injection(files={"token": b"t0ken"}, fingerprint="f1")
    on_disk = DockerProvider(docker_host, pull=False, stop_timeout=0, secrets_dir=tmp_path / "secrets")

    with pytest.raises(ProviderError, match="not a tmpfs"):
        await on_disk.scale_group(_group(iid, "ctrlmesh-test/httpd:v1", secrets), 1)
    assert not any((tmp_path / "secrets").rglob("token"))
    await on_disk.remove_all(iid)
    await on_disk.close()

    shm = Path("/dev/shm") / f"ctrlmesh-test-{uuid.uuid4().hex[:8]}"
    provider = DockerProvider(docker_host, pull=False, stop_timeout=0, secrets_dir=shm)
    try:
        await provider.scale_group(_group(iid, "ctrlmesh-test/httpd:v1", secrets), 1)
        [replica] = await provider.replicas(iid)
        code, out = await provider.exec(replica.container_id, ["cat", "/run/secrets/token"], 10)
        assert (code, out) == (0, "t0ken")
        [written] = list(shm.rglob("token"))
        assert oct(written.stat().st_mode & 0o777) == "0o444" and oct(shm.stat().st_mode & 0o777) == "0o700"
        await provider.remove_group(iid, "main", "rel_test0001")
        assert not list(shm.rglob("token"))
    finally:
        await provider.remove_all(iid)
        await provider.close()
        shutil.rmtree(shm, ignore_errors=True)
