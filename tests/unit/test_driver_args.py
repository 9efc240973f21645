"""The driver programs of the matrix take a password as a positional argument: a generated one may
begin with "-" (token_urlsafe's alphabet has it), which must not be read as an option (CI saw it)."""

from __future__ import annotations

from tests.clients.py_drivers import parse


def test_a_password_that_begins_with_a_dash_is_a_positional_argument() -> None:
    a = parse(["asyncpg", "main", "localhost", "6432", "u_1", "-Xy_z", "app", "/ca.crt"])
    assert (a.password, a.database, a.ca) == ("-Xy_z", "app", "/ca.crt")
