"""Library code depends on its driver only: importing a topic's library modules (what a
reader copies into a service) in a fresh interpreter loads neither the course's server
manager (``course_lib.services``) nor, for a Redis-only pattern, the PostgreSQL driver."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import course_lib

# Imports in a fresh interpreter, no server: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

TOPICS = ["caching", "rate_limiting", "load_balancing", "db", "profiling"]
REDIS_ONLY = {"caching", "rate_limiting"}


def library_modules(topic: str) -> list[str]:
    package = f"course_lib.{topic}"
    path = [f"{course_lib.__path__[0]}/{topic}"]
    names = [package]
    for info in pkgutil.walk_packages(path, prefix=f"{package}."):
        if ".lesson" not in info.name:
            names.append(info.name)
    return names


def loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def test_every_topic_has_library_modules() -> None:
    for topic in TOPICS:
        assert len(library_modules(topic)) > 1, topic


@pytest.mark.parametrize("topic", TOPICS)
def test_library_code_imports_no_server_manager(topic: str) -> None:
    loaded = loaded_after_import(library_modules(topic))
    managers = sorted(m for m in loaded if m.startswith("course_lib.services"))
    assert not managers, f"course_lib.{topic} (library part) loads {managers}"
    lessons = sorted(m for m in loaded if ".lesson" in m and m.startswith("course_lib."))
    assert not lessons, f"course_lib.{topic} (library part) loads lesson code {lessons}"
    if topic in REDIS_ONLY:
        drivers = sorted(m for m in loaded if m.split(".")[0] in {"psycopg", "sqlalchemy"})
        assert not drivers, f"course_lib.{topic} is Redis-only but loads {drivers[:3]}"
