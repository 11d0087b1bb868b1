"""The two ways to install the course (pip and conda) ask for the same Python packages."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

# Reads the project's files, no server: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"redis-py": "redis", "msgpack-python": "msgpack"}
# redis[hiredis] installs the hiredis package; psycopg[binary] installs psycopg-binary, which
# conda-forge folds into psycopg itself.
EXTRAS_THAT_ARE_PACKAGES = {"hiredis"}
NOT_PYTHON_PACKAGES = {"python", "pip", "redis-server", "postgresql", "nginx"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        found[normalise(req.name)] = str(req.specifier)
        for extra in req.extras & EXTRAS_THAT_ARE_PACKAGES:
            found[normalise(extra)] = ""
    return found


def environment_requirements() -> dict[str, str]:
    found = {}
    text = (ROOT / "environment.yml").read_text()
    for raw in text.split("\ndependencies:", 1)[1].splitlines():
        match = re.match(r"^\s+- ([A-Za-z0-9_.\-]+)\s*([<>=!~].*)?$", raw)
        if not match:
            continue
        name = normalise(CONDA_TO_PYPI.get(match.group(1), match.group(1)))
        if name not in NOT_PYTHON_PACKAGES:
            found[name] = (match.group(2) or "").replace(" ", "")
    return found


def test_same_packages_in_pyproject_and_environment() -> None:
    pip, conda = pyproject_requirements(), environment_requirements()
    assert sorted(set(pip) - set(conda)) == [], "missing from environment.yml"
    assert sorted(set(conda) - set(pip)) == [], "missing from pyproject.toml"


def test_same_version_bounds() -> None:
    pip, conda = pyproject_requirements(), environment_requirements()
    for name, spec in pip.items():
        if spec and conda[name]:
            assert set(spec.split(",")) == set(conda[name].split(",")), name


def test_environment_pins_python_to_the_embedded_servers_wheels() -> None:
    text = (ROOT / "environment.yml").read_text()
    assert "python>=3.11,<3.13" in text and "-e .[dev]" in text


def test_every_lua_script_ships_in_the_wheel() -> None:
    """Each .lua file matches a package-data pattern relative to its nearest package."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["*"]
    scripts = sorted((ROOT / "course_lib").rglob("*.lua"))
    assert scripts
    for script in scripts:
        package = next(p for p in script.parents if (p / "__init__.py").exists())
        relative = script.relative_to(package).as_posix()
        assert any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns), relative


def test_ci_workflow_runs_make_test_on_both_pythons_with_embedded_servers_only() -> None:
    """GitHub Actions runs the README's command on each supported Python, with no service
    containers and no COURSE_SERVICES set (the suite's first pass is "whatever the course picks",
    which on a bare runner is the embedded servers)."""
    workflow = (ROOT / ".github" / "workflows" / "test.yml").read_text()
    versions = re.search(r"python-version: \[(.*)\]", workflow)
    assert versions and versions.group(1).replace(" ", "") == '"3.11","3.12"'
    assert re.search(r"^\s+run: make test\b", workflow, re.MULTILINE)
    assert "runs-on: ubuntu-latest" in workflow
    assert not re.search(r"^\s+services:", workflow, re.MULTILINE)
    assert not re.search(r"COURSE_SERVICES\s*[:=]", workflow)


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "MIT"
    setuptools = next(
        Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools")
    )
    assert "76" not in setuptools.specifier and "77" in setuptools.specifier
