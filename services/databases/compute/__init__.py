"""Compute drivers, registered by name (CTRLMESH_COMPUTE_DRIVER). Only `local` exists; a
container or Kubernetes driver implements compute/base.py's ComputeDriver and is added here."""

from __future__ import annotations

import json

from libs.settings import Settings
from services.databases.compute.base import ComputeDriver
from services.databases.compute.local import LocalDriver


def make_driver(settings: Settings) -> ComputeDriver:
    name = settings.compute_driver
    if name == "local":
        return LocalDriver(settings.data_dir, extra_settings=profile_overrides(settings.profile_settings))
    raise SystemExit(f"unknown CTRLMESH_COMPUTE_DRIVER {name!r} (known: local)")


def profile_overrides(text: str) -> dict[str, dict[str, str]]:
    """CTRLMESH_PROFILE_SETTINGS: {"L2": {"work_mem": "8MB"}} → per-profile extra settings."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
        return {str(p): {str(k): str(v) for k, v in kv.items()} for p, kv in raw.items()}
    except (ValueError, AttributeError) as err:
        raise SystemExit(f"CTRLMESH_PROFILE_SETTINGS is not a JSON object of objects: {err}") from err
