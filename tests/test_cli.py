"""The ``course`` command, run as a user runs it: a subprocess with its own environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_lib.cli import LAB_SETTINGS, ROOT_NOTE, lab_command, lab_settings_file

ROOT = Path(__file__).resolve().parent.parent


def course(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    # COURSE_SERVICES and COURSE_STATE_DIR pass through: under `make test-embedded` the
    # command runs on the embedded servers too.
    merged = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    merged.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "course_lib.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=merged,
        timeout=timeout,
    )


def test_doctor_reports_both_services() -> None:
    done = course("doctor")
    assert done.returncode == 0, done.stderr
    rows: dict[str, str] = {}
    for words in map(str.split, done.stdout.splitlines()):
        if len(words) > 1:
            rows.setdefault(words[0], words[1])  # the services table comes first
    assert rows["redis"] == "True" and rows["postgres"] == "True"
    assert rows["python"].startswith("3.")


# The tests of an unreachable URL set COURSE_SERVICES=auto themselves: the pass's setting
# does not change what they check, so one pass of `make test` covers them.
@pytest.mark.one_pass
def test_doctor_with_unreachable_url_fails_with_one_clear_line() -> None:
    # auto: an explicit URL is only ignored when COURSE_SERVICES=embedded forces the embedded.
    done = course("doctor", env={"REDIS_URL": "redis://127.0.0.1:1", "COURSE_SERVICES": "auto"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert "REDIS_URL=redis://127.0.0.1:1" in errors[0] and "Traceback" not in done.stderr


def _notebook(path: Path, *sources: str) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# A broken notebook")])
    nb.cells += [new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


@pytest.mark.one_pass
@pytest.mark.timeout(300)
def test_build_with_embedded_services(tmp_path: Path) -> None:
    state = Path(f"/tmp/pc-build-{os.getpid()}")
    env = {"COURSE_SERVICES": "embedded", "COURSE_STATE_DIR": str(state)}
    try:
        done = course("build", "notebooks/00_setup.ipynb", "--out", str(tmp_path), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        index = (tmp_path / "index.html").read_text()
        assert "00 · Setup and the latency ladder" in index and "class='ok'" in index
        assert (tmp_path / "00_setup.html").stat().st_size > 10_000
        # the ladder chart is 00's tagged key chart; the landing page shows it and links slides
        assert (tmp_path / "thumbs" / "00_setup.png").read_bytes().startswith(b"\x89PNG")
        assert "src='thumbs/00_setup.png'" in index and "href='00_setup.slides.html'" in index
        assert "servers used: redis " in index and ", postgres " in index
        executed = json.dumps(nbformat.read(tmp_path / "00_setup.ipynb", as_version=4).cells)
        assert executed.count("COURSE_SERVICES=embedded") >= 2  # both services, embedded
        status = course("services", "status", env=env)
        assert "redis: embedded server running" in status.stdout
    finally:
        stopped = course("services", "stop", env=env)
        shutil.rmtree(state, ignore_errors=True)
    assert "redis: stopped" in stopped.stdout and "postgres: stopped" in stopped.stdout


def test_lab_provisions_services_then_hands_over_to_jupyter() -> None:
    done = course("lab", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("REDIS_URL=") and "DATABASE_URL=" in done.stdout
    assert done.stdout.strip().splitlines()[-1][0].isdigit()  # jupyter lab's version
    # root (CI, containers) gets --allow-root, with one line saying so and why
    assert (ROOT_NOTE in done.stdout.splitlines()) == (os.geteuid() == 0)
    # the course's JupyterLab settings are in this environment: no news prompt
    settings = json.loads(lab_settings_file().read_text())
    assert settings == LAB_SETTINGS
    assert settings["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


@pytest.mark.one_pass
def test_lab_passes_allow_root_to_root_only_and_opens_on_the_start_page(tmp_path: Path) -> None:
    as_user, notes = lab_command(tmp_path, ["--port=9"], as_root=False, start="START_HERE.md")
    assert "--allow-root" not in as_user and notes == []
    assert "--LabApp.default_url=/lab/tree/START_HERE.md" in as_user
    assert as_user[-1] == "--port=9"  # the user's options come last, so they win
    as_root, notes = lab_command(tmp_path, [], as_root=True, start=None)
    assert "--allow-root" in as_root and notes == [ROOT_NOTE]
    assert not [arg for arg in as_root if "default_url" in arg]
    # given by the user already: not twice, and nothing to explain
    again, notes = lab_command(tmp_path, ["--allow-root"], as_root=True, start=None)
    assert again.count("--allow-root") == 1 and notes == []


@pytest.mark.one_pass
def test_slides_set_writes_default_slide_types_into_the_given_notebooks(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "01_x.ipynb", "x = 1")
    done = course("slides", "--set", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: 2 cell(s) got a slide type"
    kinds = [c.metadata["slideshow"]["slide_type"] for c in nbformat.read(path, 4).cells]
    assert kinds == ["slide", "fragment"]
    assert course("slides", "--set", str(path)).stdout.strip() == f"{path}: unchanged"
    missing = course("slides", "--set", str(tmp_path / "nope.ipynb"))
    assert missing.returncode == 2 and "not a notebook file" in missing.stderr


@pytest.mark.one_pass
def test_build_refuses_a_missing_notebook_before_running_anything(tmp_path: Path) -> None:
    done = course("build", str(tmp_path / "nope.ipynb"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"course: error: not a notebook file: {tmp_path / 'nope.ipynb'}"
    assert not (tmp_path / "out" / "index.html").exists()


# One pair of builds (each a `course` process and a kernel) for both claims.
@pytest.mark.one_pass
@pytest.mark.timeout(180)
def test_build_names_the_failing_notebook_and_cell_and_keeps_earlier_rows(tmp_path: Path) -> None:
    good = _notebook(tmp_path / "01_good.ipynb", "x = 1")
    broken = _notebook(tmp_path / "02_broken.ipynb", "x = 1", "assert x == 2, 'x is not 2'")
    assert course("build", str(good), "--out", str(tmp_path / "out")).returncode == 0
    done = course("build", str(broken), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert f"FAILED  {broken} cell 2: AssertionError: x is not 2" in done.stdout
    index = (tmp_path / "out" / "index.html").read_text()
    assert "A broken notebook" in index and "FAILED at cell 2" in index
    # the index keeps the row of the notebook built earlier
    assert "01_good.html" in index and "02_broken.html" in index
    assert index.count("class='ok'") == 1 and index.count("class='fail'") == 1


# Each form of issue 18 (finding 6) that `course doctor` once printed in part or in clear.
@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("variable", "value", "secrets"),
    [
        ("DATABASE_URL", "host=127.0.0.1 port=1 password=Hunter2secret dbname=course", ["Hunter2"]),
        ("DATABASE_URL", "password=Hunter2secret host=127.0.0.1 port=1", ["Hunter2"]),
        ("DATABASE_URL", "host=127.0.0.1 port=1 password='two words' dbname=c", ["two", "words"]),
        ("DATABASE_URL", "postgresql://u:p@ssWORDtail@127.0.0.1:1/course", ["ssWORD", "p@"]),
        ("REDIS_URL", "redis://u:p@ssWORDtail@127.0.0.1:1/0", ["ssWORD", "p@"]),
    ],
)
def test_doctor_never_prints_a_password(variable: str, value: str, secrets: list[str]) -> None:
    done = course("doctor", env={variable: value, "COURSE_SERVICES": "auto"})
    assert done.returncode != 0 and "***" in done.stderr, done.stderr
    for secret in secrets:
        assert secret not in done.stdout + done.stderr, done.stderr


@pytest.mark.one_pass
def test_build_refuses_a_pool_of_no_kernels_before_running_anything(tmp_path: Path) -> None:
    done = course("build", "--jobs", "0", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--jobs: must be a positive number, got 0" in done.stderr
    assert not (tmp_path / "out").exists()
