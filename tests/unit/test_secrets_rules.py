"""The rules of secret injection and KEK rotation as plain functions: which secret goes where,
the env-override rule, registry credentials in both accepted forms, the fingerprint (versions,
never values), and a re-wrap that keeps the data ciphertext."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from ctrlmesh.network.v1 import network_pb2

from libs.crypto import Keyring, parse_previous
from libs.errors import CtrlmeshError, DeadlineExceeded, NotFound, PermissionDenied, Unavailable
from services.instances.providers.base import Injection, ProviderError
from services.instances.providers.docker import container_env
from services.instances.secrets_client import SecretsClient, injection, registry_credentials


def _sec(
    key: str, type_: str, value: str, version: int = 1, id_: str = "sec_1"
) -> network_pb2.ResolvedSecret:
    return network_pb2.ResolvedSecret(key=key, type=type_, value=value, version=version, id=id_)


def test_each_type_goes_where_it_belongs_and_env_secrets_override_env():
    """env → environment (over the service's entry of the same name), file and tls → files,
    registry → pull credentials."""
    inj = injection(
        [
            _sec("GREETING", "env", "from-secret"),
            _sec("cfg.json", "file", "{}"),
            _sec("tls.pem", "tls", "PEM"),
            _sec(
                "hub",
                "registry",
                json.dumps({"username": "u", "password": "p", "serveraddress": "r.example:5000"}),
            ),
        ]
    )
    assert inj.env == {"GREETING": "from-secret"} and set(inj.files) == {"cfg.json", "tls.pem"}
    env = container_env({"env": {"GREETING": "plain", "OTHER": "x"}}, inj)
    assert env == ["GREETING=from-secret", "OTHER=x"]
    assert inj.auth_for("r.example:5000/team/app:1") == {
        "username": "u",
        "password": "p",
        "serveraddress": "r.example:5000",
    }
    assert inj.auth_for("team/app:1") is None and "from-secret" not in repr(inj)


def test_registry_credentials_in_both_forms_and_docker_hub_matching():
    """{username, password, serveraddress} and a Docker config's `auths` are both read; an image
    without a registry host is Docker Hub's."""
    config = {"auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"me:pw").decode()}}}
    [hub] = registry_credentials("cfg", json.dumps(config))
    assert hub == {"username": "me", "password": "pw", "serveraddress": "https://index.docker.io/v1/"}
    assert registry_credentials("bad", "not json") == []
    inj = Injection(registry_auth=(hub,))
    assert inj.auth_for("me/private:1") == hub and inj.auth_for("ghcr.io/me/private:1") is None


def test_the_fingerprint_names_versions_and_ids_never_values():
    """Another version or a re-created secret (another id) changes it; the value alone cannot."""
    base = injection([_sec("A", "env", "one")]).fingerprint
    assert base and injection([_sec("A", "env", "two")]).fingerprint == base
    assert injection([_sec("A", "env", "one", version=2)]).fingerprint != base
    assert injection([_sec("A", "env", "one", id_="sec_2")]).fingerprint != base
    assert injection([]).fingerprint == ""


def test_rewrap_moves_a_blob_to_the_primary_kek_without_touching_its_data():
    """The data nonce and ciphertext stay; only the wrapped data key and key id change."""
    old = Keyring({"k1": b"a" * 32}, "k1")
    blob = old.encrypt_str("value", aad="sec_1:1")
    both = Keyring({"k1": b"a" * 32, "k2": b"b" * 32}, "k2")
    new = both.rewrap(blob)
    assert Keyring.key_id(blob) == "k1" and Keyring.key_id(new) == "k2"
    # data nonce (12) + "value" (5) + tag (16)
    assert base64.b64decode(new)[-33:] == base64.b64decode(blob)[-33:]
    assert Keyring({"k2": b"b" * 32}, "k2").decrypt_str(new, aad="sec_1:1") == "value"
    assert both.rewrap(new) == new
    assert parse_previous(f"k0:{base64.b64encode(b'c' * 32).decode()}, ") == {"k0": b"c" * 32}
    with pytest.raises(ValueError, match="id:base64"):
        parse_previous("just-a-key")


class _Refusing(SecretsClient):
    """A client whose network service answers every call with `err`."""

    def __init__(self, err: CtrlmeshError):
        self.err = err

    @property
    def channel(self) -> Any:
        class Channel:  # what the stub's constructor asks of a channel; `call` never uses it
            def unary_unary(self, *a: Any, **kw: Any) -> None:
                return None

        return Channel()

    async def call(self, rpc: Any, request: Any, **kw: Any) -> Any:
        raise self.err


@pytest.mark.parametrize("err", [Unavailable("network is down"), DeadlineExceeded("slow")])
def test_a_network_service_that_is_down_is_retried_not_a_failed_rollout(err: CtrlmeshError):
    """Down or slow (a restart of the mesh starts network after instances resumes a deployment, as
    CI saw): the error is left for the reconcile engine to retry; it is not the rollout's failure."""
    with pytest.raises(type(err)):
        asyncio.run(_Refusing(err).resolve("ten_1", "inst_1", None))


@pytest.mark.parametrize("err", [NotFound("no such instance"), PermissionDenied("system only")])
def test_a_refusal_of_the_secrets_fails_the_rollout(err: CtrlmeshError):
    with pytest.raises(ProviderError, match="secrets could not be resolved"):
        asyncio.run(_Refusing(err).resolve("ten_1", "inst_1", None))
