"""Compute drivers, registered by name (CTRLMESH_COMPUTE_DRIVER). Only `local` exists; a
container or Kubernetes driver implements compute/base.py's ComputeDriver and is added here."""

from __future__ import annotations

from libs.settings import Settings
from services.databases.compute.base import ComputeDriver
from services.databases.compute.local import LocalDriver


def make_driver(settings: Settings) -> ComputeDriver:
    name = settings.compute_driver
    if name == "local":
        return LocalDriver(settings.data_dir)
    raise SystemExit(f"unknown CTRLMESH_COMPUTE_DRIVER {name!r} (known: local)")
