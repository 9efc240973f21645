"""The two platform secrets every process needs: the internal signing secret and the KEK.

Set them with CTRLMESH_INTERNAL_SECRET / CTRLMESH_KEK, or let the first process generate them
into `<data_dir>/secrets/` (mode 0600), where every later process on the machine finds them.
"""

from __future__ import annotations

import base64
import os
import secrets as _secrets
from pathlib import Path

from libs.crypto import Keyring
from libs.settings import Settings


def _file_secret(path: Path, make: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(make).decode())
    return path.read_text().strip()


def internal_secret(settings: Settings) -> bytes:
    if settings.internal_secret:
        return settings.internal_secret.encode()
    return _file_secret(settings.secret_file("internal_secret"), _secrets.token_bytes(32)).encode()


def keyring(settings: Settings) -> Keyring:
    kek = settings.kek or _file_secret(settings.secret_file("kek"), _secrets.token_bytes(32))
    return Keyring.from_b64(kek, settings.kek_id, settings.kek_previous)
