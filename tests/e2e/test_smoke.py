"""Smoke: the mesh the launcher starts answers health and an authenticated call."""

import pytest

pytestmark = pytest.mark.e2e


def test_health_is_healthy_without_auth(mesh):
    """GET /health needs no key and reports healthy with the version."""
    r = mesh.client().get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "healthy", "version": "0.1.0"}


def test_profile_with_admin_key(mesh):
    """The admin key printed by the launcher works on an authenticated route."""
    r = mesh.admin().get("/v2/account/profile")
    assert r.status_code == 200, r.text
    assert r.json()["plan"] == "standard_payg"
