"""The course as a student meets it, in a real headless Chromium (the system's, driven by
Playwright, which downloads no browser of its own): ``course lab`` started the way the README
says, with a notebook open and the live slideshow; and the landing page ``course build``
writes, opened from disk, every card, thumbnail and link resolving.

Skipped, saying why, where no Chromium is installed (``.ci/run`` installs Debian's). Each test
stops what it started (the server, its kernels), also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import psutil
import pytest

from course_lib.build import chromium_binary, chromium_flags

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "course-browser-test"

pytestmark = pytest.mark.one_pass


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """A headless Chromium with a new, empty profile, closed at the end."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory(prefix="course-chromium-") as profile, sync_playwright() as p:
        # Playwright adds --headless itself; the other flags keep the browser off the network
        # except for the pages it is given.
        flags = [
            f
            for f in chromium_flags(Path(profile))
            if not f.startswith(("--headless", "--user-data-dir"))
        ]
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=binary,
            headless=True,
            args=flags,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _stop(server: subprocess.Popen[bytes], base: str) -> None:
    """Shut down the server's kernels through its API, then the server and anything it
    started (kernels run in sessions of their own, so they are found as its descendants)."""
    try:
        status, body = _get(f"{base}/api/kernels?token={TOKEN}")
        for kernel in json.loads(body) if status == 200 else []:
            request = urllib.request.Request(
                f"{base}/api/kernels/{kernel['id']}?token={TOKEN}", method="DELETE"
            )
            urllib.request.urlopen(request, timeout=10).close()
    except (OSError, ValueError):
        pass  # the server is already gone: its descendants are still stopped below
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """``course lab`` on a free loopback port, as the README starts it; yields its base URL."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # The test's own JupyterLab user settings and workspaces: nothing of the user's is read
    # or changed (the course's settings come from the environment, as for a student).
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    # no autosave: the test opens the course's own notebooks and must not write them back
    docmanager = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text('{"autosave": false}')
    log = (tmp_path / "lab.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "course_lib.cli",
            "lab",
            f"--port={port}",
            "--no-browser",
            f"--IdentityProvider.token={TOKEN}",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _poll_status(base) != 200:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            assert time.monotonic() < deadline, "JupyterLab did not answer in 120 s"
            time.sleep(0.2)  # polling for a state: the server answers or has died
        yield base
    finally:
        _stop(server, base)
        log.close()
    output = (tmp_path / "lab.log").read_text()
    if os.geteuid() == 0:
        assert "running as root (usual in containers), so JupyterLab gets --allow-root" in output


def _offline(page: object, allowed: str) -> list[str]:
    """Refuse every request of ``page`` whose URL does not start with ``allowed``; return
    the list the refused URLs are added to."""
    refused: list[str] = []

    def route(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if url.startswith(allowed) or url.startswith(("data:", "blob:")):
            route.continue_()  # type: ignore[attr-defined]
        else:
            refused.append(url)
            route.abort()  # type: ignore[attr-defined]

    page.route("**/*", route)  # type: ignore[attr-defined]
    return refused


def _keep(page: object, name: str) -> None:
    """Save a screenshot where ``COURSE_KEEP_SCREENSHOTS`` names a folder (to look at)."""
    keep = os.environ.get("COURSE_KEEP_SCREENSHOTS")
    if keep:
        page.screenshot(path=str(Path(keep) / name))  # type: ignore[attr-defined]


def _poll_status(base: str) -> int:
    try:
        return _get(f"{base}/api/status?token={TOKEN}")[0]
    except OSError:
        return 0


@pytest.mark.timeout(240)
def test_lab_opens_on_the_start_page_and_renders_a_notebook_and_its_slideshow(
    lab: str, chromium: object
) -> None:
    page = chromium.new_page()  # type: ignore[attr-defined]
    # offline, as in a classroom without network: only the server on loopback answers
    remote = _offline(page, allowed=lab)
    try:
        # the course's settings, from this environment: no news prompt, no update check
        status, body = _get(
            f"{lab}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={TOKEN}"
        )
        schema = json.loads(body)["schema"]["properties"]
        assert status == 200 and schema["fetchNews"]["default"] == "false"

        # the root URL opens the start page, rendered, listing the six notebooks
        page.goto(f"{lab}/?token={TOKEN}")
        preview = page.locator(".jp-RenderedMarkdown").filter(has_text="perf-course: start here")
        preview.wait_for(timeout=90_000)
        text = preview.inner_text()
        for title in ("00 · Setup", "01 · Caching", "02 · Load balancing", "05 · Profiling"):
            assert title in text
        assert "session length" in text
        assert page.get_by_text("official Jupyter news").count() == 0
        _keep(page, "lab-start.png")

        # a notebook: its title and its first chart rendered from the saved outputs
        page.goto(f"{lab}/lab/tree/00_setup.ipynb?token={TOKEN}")
        notebook = page.locator(".jp-NotebookPanel:visible .jp-Notebook")
        notebook.locator("h1", has_text="00 · Setup and the latency ladder").wait_for(
            timeout=90_000
        )
        chart = notebook.locator(".jp-OutputArea-output img").first
        chart.scroll_into_view_if_needed(timeout=60_000)
        chart.wait_for(state="visible", timeout=60_000)
        assert chart.evaluate("img => img.naturalWidth") > 100
        assert page.get_by_text("official Jupyter news").count() == 0
        _keep(page, "lab-notebook.png")

        # the live slideshow (RISE) of that notebook, from the same JupyterLab
        page.goto(f"{lab}/rise/00_setup.ipynb?token={TOKEN}")
        page.locator(".reveal .slides section").first.wait_for(timeout=90_000)
        assert "00 · setup and the latency ladder" in page.locator(".reveal").inner_text().lower()
        _keep(page, "lab-rise.png")
        assert remote == []  # nothing tried to leave the machine
    finally:
        page.close()


@pytest.mark.timeout(300)
def test_the_built_landing_page_resolves_every_card_thumbnail_and_link(
    tmp_path: Path, chromium: object
) -> None:
    out = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "course_lib.cli",
            "build",
            "notebooks/00_setup.ipynb",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = chromium.new_page()  # type: ignore[attr-defined]
    remote = _offline(page, allowed="file:")
    try:
        page.goto((out / "index.html").as_uri())
        cards = page.locator(".card")
        assert cards.count() >= 1
        assert "00 · Setup and the latency ladder" in cards.first.inner_text()
        assert "session length" in cards.first.inner_text()
        images = page.locator("img")
        assert images.count() >= 1
        for i in range(images.count()):
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), (
                images.nth(i).get_attribute("src")
            )
        hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
        assert hrefs
        for href in hrefs:
            target = Path(unquote(urlparse(href).path))
            assert href.startswith("file:") and target.is_file(), href
        # the slides show their first slide offline: reveal.js is in the build
        page.goto((out / "00_setup.slides.html").as_uri())
        page.wait_for_function("document.querySelector('.reveal.ready') !== null", timeout=30_000)
        first = page.locator(".reveal .slides section.present").first
        assert "00 · Setup and the latency ladder" in first.inner_text()  # not capitalised
        page.screenshot(path=str(out / "slides.png"))
        assert remote == []
        page.goto((out / "index.html").as_uri())
        page.screenshot(path=str(out / "landing.full.png"), full_page=True)
    finally:
        page.close()
    # course build kept a screenshot of the landing page with the build
    assert (out / "landing.png").read_bytes().startswith(b"\x89PNG")
    keep = os.environ.get("COURSE_KEEP_SCREENSHOTS")  # a folder to look at them afterwards
    if keep:
        for name in ("landing.png", "landing.full.png", "slides.png"):
            shutil.copy(out / name, Path(keep) / name)
