"""The course landing page, slides and instructor pages that ``course build`` writes, built from
tiny notebooks in a temporary course folder (the real notebooks are not executed here)."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_lib.build import (
    build,
    cell_seconds,
    key_chart,
    longest_first,
    notebook_goals,
    runs_alone,
    servers_used,
    session_length,
    set_default_slides,
    start_page,
    with_default_slides,
)

# The notebooks built here use no service of the course: one pass of `make test` covers them.
pytestmark = pytest.mark.one_pass

CHART = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1, 2], {ys})
plt.show()"""

INTRO = """\
# 01 · A tiny topic

After this notebook you can:

- measure `one thing` with **care**, *twice*;
- explain another.

**Services:** none. **Run time:** a second."""


def _write(path: Path, *cells: nbformat.NotebookNode) -> Path:
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _chart_cell(tagged: bool) -> nbformat.NotebookNode:
    cell = new_code_cell(CHART.format(ys=[4, 1, 0] if tagged else [0, 1, 4]))
    if tagged:
        cell.metadata["tags"] = ["key-chart"]
    return cell


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A course folder: one notebook with a tagged chart, its solutions, one notebook without a
    tagged chart, and instructor pages for the first and for a notebook not written yet."""
    notebooks = tmp_path / "notebooks"
    _write(
        notebooks / "01_tiny.ipynb",
        new_markdown_cell(INTRO),
        new_code_cell("x = 1"),
        new_markdown_cell("## 1.1 A section\n\nSome prose."),
        _chart_cell(tagged=False),
        _chart_cell(tagged=True),
        new_markdown_cell("## 1.2 Another section"),
        new_code_cell("print(x + 1)"),
        # the notebook uses Redis (a call it made), not PostgreSQL (a comment, a call not run)
        new_code_cell("def redis_url():\n    return 'redis://'\n\nredis_url()  # not engine()"),
    )
    _write(
        notebooks / "solutions" / "01_tiny_solutions.ipynb",
        new_markdown_cell("# 01 · A tiny topic: solutions"),
        new_code_cell("assert 1 + 1 == 2"),
    )
    _write(
        notebooks / "02_plain.ipynb",
        new_markdown_cell("# 02 · Plain\n\n- one goal"),
        new_code_cell("y = 2"),
    )
    instructor = notebooks / "instructor"
    instructor.mkdir()
    (instructor / "01_tiny.md").write_text(
        "# 01 · Instructor notes\n\n**Session length:** about 25 minutes (the table below). "
        "**Needs:** Redis.\n\n## 1.1 A section\n\n10 min."
    )
    (instructor / "04_later.md").write_text("# 04 · Later topic: instructor notes\n\nSoon.")
    return tmp_path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Refuse every connection and name lookup that would leave this machine (the kernel's
    loopback sockets still work); yields the refused attempts."""
    refused: list[object] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def local(host: object) -> bool:
        if host in ("localhost", "", None):
            return True
        try:
            return ipaddress.ip_address(str(host)).is_loopback
        except ValueError:
            return False

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):  # type: ignore[index]
            refused.append(address)
            raise OSError("network unreachable (test is offline)")
        real_connect(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if not local(host):
            refused.append(host)
            raise socket.gaierror(f"offline: cannot resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield refused


@pytest.mark.timeout(240)
def test_landing_page_slides_and_instructor_pages_build_offline(
    course: Path, offline: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on CI: a non-interactive backend in the environment must not cost the charts
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = course / "build"
    runs = build(course, out=out, services_used=["redis 7.0 (local)", "postgres 15 (local)"])
    assert [run.ok for run in runs] == [True, True, True]
    assert offline == []  # nothing tried to reach the network
    index = (out / "index.html").read_text()

    # a pointer to where to start: setup, then the first notebook
    start = index[index.index("Start here") : index.index("<div class='card'>")]
    assert "<code>make course</code>" in start and "href='01_tiny.html'" in start

    # one card per course notebook, its solutions on the same card
    assert index.count("<div class='card'>") == 2
    tiny = index[index.index("01 · A tiny topic") : index.index("02 · Plain")]
    assert (
        "<li>measure <code>one thing</code> with <strong>care</strong>, <em>twice</em>;</li>"
        in tiny
    )
    assert "<li>explain another.</li>" in tiny
    # the servers the notebook used, with their versions; the session length of its page
    assert "servers used: redis 7.0 (local)</div>" in tiny
    assert re.search(
        r"<span class='ok'>ok</span>, ran in [0-9.]+ s; built \d{4}-\d\d-\d\d .*UTC; "
        r"session length about 25 minutes</div>",
        tiny,
    )
    for link in (
        "href='01_tiny.html'",
        "href='01_tiny.slides.html'",
        "href='instructor/01_tiny.html'",
        "href='solutions/01_tiny_solutions.html'",
    ):
        assert link in tiny
    assert (out / "solutions" / "01_tiny_solutions.html").is_file()

    # the key chart is the tagged cell's PNG, not the untagged chart before it
    built = nbformat.read(out / "01_tiny.ipynb", as_version=4)
    untagged, tagged = (c.outputs[0].data["image/png"] for c in built.cells[3:5])
    thumb = (out / "thumbs" / "01_tiny.png").read_bytes()
    assert thumb == key_chart(built) == base64.b64decode(tagged) != base64.b64decode(untagged)
    assert thumb.startswith(b"\x89PNG")
    # a click on the thumbnail opens the chart itself, full size
    full_size = "<a href='thumbs/01_tiny.png' title='open the chart full size'>"
    assert f"{full_size}<img src='thumbs/01_tiny.png'" in tiny

    # a notebook without a tagged chart, slides or instructor page shows none of them
    plain = index[index.index("02 · Plain") : index.index("not built here yet")]
    assert "<img" not in plain and "instructor/02" not in plain and "solutions" not in plain
    assert "servers used: none of Redis, PostgreSQL or nginx" in plain
    assert "session length" not in plain
    assert "href='02_plain.slides.html'" in plain
    assert not (out / "thumbs" / "02_plain.png").exists()

    # static: inline CSS, no script, no stylesheet or image fetched from elsewhere
    assert "<script" not in index and "<link" not in index
    assert not re.search(r"src=['\"]?(https?:)?//", index)
    assert re.search(r"Course page built \d{4}-\d\d-\d\d", index)

    # instructor pages: rendered, and the one whose notebook does not exist yet is listed
    assert "10 min." in (out / "instructor" / "01_tiny.html").read_text()
    assert "href='instructor/04_later.html'>04 · Later topic: instructor notes" in index
    assert "instructor/01_tiny.html'>" not in index.split("not built here yet")[-1]
    # each links back to the course page, and to its notebook and slides where built
    tiny_page = (out / "instructor" / "01_tiny.html").read_text()
    for link in ("../index.html", "../01_tiny.html", "../01_tiny.slides.html"):
        assert f'href="{link}"' in tiny_page
    later_page = (out / "instructor" / "04_later.html").read_text()
    assert 'href="../index.html"' in later_page and "../04_later.html" not in later_page

    # slides: one reveal.js slide per heading by default, and reveal.js is in the build: the
    # page loads nothing from the network (no CDN, no web font), so it works offline
    slides = (out / "01_tiny.slides.html").read_text()
    assert "1.2 Another section" in slides
    loaded = re.findall(r"(?:src|href)=\"([^\"]+)\"", slides)
    assert "reveal.js/dist/reveal.js" in loaded and "reveal.js/dist/theme/white.css" in loaded
    assert not [url for url in loaded if re.match(r"(https?:)?//", url)]
    assert "require(" not in slides and "unpkg.com" not in slides
    assert "text-transform: none" in slides  # headings as written, not capitalised by the theme
    for name in loaded:
        if name.startswith("reveal.js/"):
            assert (out / name).is_file(), name
    theme = (out / "reveal.js/dist/theme/white.css").read_text()
    assert "//" not in "".join(re.findall(r"@import url\(([^)]*)\)", theme))


def test_goals_are_the_first_cells_bullets() -> None:
    nb = new_notebook(cells=[new_markdown_cell(INTRO), new_markdown_cell("- not a goal")])
    assert notebook_goals(nb) == ["measure `one thing` with **care**, *twice*;", "explain another."]


def test_default_slide_types_follow_headings_and_charts() -> None:
    chart = new_code_cell("plot()")
    chart.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBOR"})]
    # a table printed by a short cell: as a fragment it would push the heading off the screen
    tall = new_code_cell("print(table)")
    tall.outputs = [nbformat.v4.new_output("stream", name="stdout", text="row\n" * 30)]
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Title"),
            new_markdown_cell("prose"),
            new_code_cell("x = 1"),
            chart,
            new_markdown_cell("the next step"),
            new_code_cell("y = 2"),
            tall,
            new_markdown_cell("## 1.1 Next"),
        ]
    )
    slides = with_default_slides(nb)
    kinds = [c.metadata["slideshow"]["slide_type"] for c in slides.cells]
    assert kinds == [
        "slide", "-", "fragment", "subslide", "subslide", "fragment", "subslide", "slide"
    ]  # fmt: skip
    assert "slideshow" not in nb.cells[0].metadata  # the notebook itself is left alone


def test_a_cells_own_slide_type_is_kept_and_the_others_get_the_default() -> None:
    nb = new_notebook(cells=[new_markdown_cell("# Title"), new_code_cell("x = 1")])
    nb.cells[1].metadata["slideshow"] = {"slide_type": "skip"}
    kinds = [c.metadata["slideshow"]["slide_type"] for c in with_default_slides(nb).cells]
    assert kinds == ["slide", "skip"]


def test_slides_set_writes_slide_types_into_the_notebook_and_nothing_else(
    tmp_path: Path,
) -> None:
    chart = new_code_cell("plot()", execution_count=2)
    chart.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBOR"})]
    path = _write(
        tmp_path / "01_x.ipynb",
        new_markdown_cell("# Title"),
        new_code_cell("x = 1", execution_count=1),
        chart,
    )
    before = nbformat.read(path, as_version=4)
    before.cells[1].metadata["slideshow"] = {"slide_type": "skip"}  # an author's choice
    nbformat.write(before, path)

    assert set_default_slides(path) == 2
    after = nbformat.read(path, as_version=4)
    kinds = [c.metadata["slideshow"]["slide_type"] for c in after.cells]
    assert kinds == ["slide", "skip", "subslide"]
    for old, new in zip(before.cells, after.cells, strict=True):
        assert (old.source, old.get("outputs"), old.get("execution_count")) == (
            new.source,
            new.get("outputs"),
            new.get("execution_count"),
        )
    written = path.read_bytes()
    assert set_default_slides(path) == 0 and path.read_bytes() == written  # re-runnable


def test_servers_used_counts_calls_of_cells_that_ran() -> None:
    def ran(source: str) -> nbformat.NotebookNode:
        return new_code_cell(source, execution_count=1)

    nb = new_notebook(
        cells=[
            ran("print(services.status())  # reports on both servers, uses neither"),
            ran("client = services.redis_client()"),
            new_code_cell("engine = services.engine()"),  # never ran (the run stopped)
            ran("# with run_nginx(config) as nginx: commented out"),
            ran("frame.stack()"),  # pandas, not notebook 06's rig
        ]
    )
    assert servers_used(nb) == ["redis"]
    nb.cells[2].execution_count = 3
    nb.cells.append(ran("with run_nginx(NGINX, upstreams) as port:\n    pass"))
    assert servers_used(nb) == ["redis", "postgres", "nginx"]


def test_session_length_of_every_instructor_page() -> None:
    root = Path(__file__).resolve().parent.parent
    pages = sorted((root / "notebooks" / "instructor").glob("[0-9][0-9]_*.md"))
    assert len(pages) == 7  # 00-06
    for page in pages:
        length = session_length(page.read_text())
        assert length and re.match(r"(about )?\d+ minutes", length), (page.name, length)
    assert session_length(
        "**Session length:** 100 minutes (the table below): teach it as "
        "two sessions (1-2, then 3-4). **Needs:** x"
    ) == ("100 minutes, as two sessions")
    assert session_length("# no such line") is None


def test_start_page_lists_the_notebooks_with_run_times_where_built(course: Path) -> None:
    ledger = course / "runs.json"
    ledger.write_text(
        '[{"page": "01_tiny.html", "ok": true, "seconds": 3.2, "built": "2026-01-02 10:00 UTC",'
        ' "servers": ["redis 7.0 (local)"]}]'
    )
    page = start_page(course, ledger)
    tiny = page[page.index("## [01 · A tiny topic](01_tiny.ipynb)") : page.index("## [02")]
    assert "- measure `one thing` with **care**, *twice*;" in tiny
    assert "*ran in 3.2 s on 2026-01-02 10:00 UTC; session length about 25 minutes; " in tiny
    assert "servers used: redis 7.0 (local).*" in tiny
    plain = page[page.index("## [02 · Plain](02_plain.ipynb)") :]
    assert "not built yet" in plain
    assert "solutions" not in page  # the start page lists the course's notebooks only
    assert "not built yet" in start_page(course, course / "missing.json")


@pytest.mark.timeout(120)
def test_a_partial_build_lists_the_instructor_pages_of_notebooks_it_did_not_build(
    course: Path, tmp_path: Path
) -> None:
    out = tmp_path / "partial"
    (run,) = build(course, [course / "notebooks" / "02_plain.ipynb"], out=out)
    assert run.ok
    index = (out / "index.html").read_text()
    assert index.count("<div class='card'>") == 1
    unlisted = index.split("not built here yet")[1]
    assert "href='instructor/01_tiny.html'" in unlisted
    assert "href='instructor/04_later.html'" in unlisted


def test_the_committed_notebooks_declare_the_servers_they_use_by_using_them() -> None:
    root = Path(__file__).resolve().parent.parent
    used = {
        path.stem: servers_used(nbformat.read(path, as_version=4))
        for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    }
    # 02 runs HTTP backends, its proxy and nginx: neither Redis nor PostgreSQL
    assert used["02_load_balancing"] == ["nginx"]
    assert used["00_setup"] == ["redis", "postgres"]  # the latency ladder measures both
    assert "postgres" in used["04_db_optimization"] and "redis" in used["03_rate_limiting"]
    assert used["06_capstone"][:2] == ["redis", "postgres"]  # its rig starts its own of both


def test_nginx_is_shown_with_its_version_or_as_not_installed() -> None:
    from course_lib.build import _servers_line
    from course_lib.load_balancing.nginx import nginx_binary

    line = _servers_line(["redis", "nginx"], ["redis 7.2 (local)", "postgres 16 (local)"])
    assert line[0] == "redis 7.2 (local)"  # postgres was not used: not listed
    assert len(line) == 2
    if nginx_binary() is None:
        assert line[1] == "nginx not installed (its comparison was skipped)"
    else:
        assert re.fullmatch(r"nginx \d+\.\d+\.\d+ \(compared with the course proxy\)", line[1])


# A notebook that says it started, then waits (polling, with a deadline) until its partner
# notebook has started too: both finish only if the build runs them side by side.
MEET = """\
import pathlib, time
here = pathlib.Path({folder!r})
(here / "{me}.started").touch()
deadline = time.monotonic() + 60
while not (here / "{other}.started").exists():
    assert time.monotonic() < deadline, "{other} never ran alongside {me}"
    time.sleep(0.01)"""


@pytest.mark.timeout(240)
def test_two_kernels_run_side_by_side_and_the_results_keep_reading_order(
    tmp_path: Path,
) -> None:
    notebooks = tmp_path / "notebooks"
    for me, other in (("01_a", "02_b"), ("02_b", "01_a")):
        _write(
            notebooks / f"{me}.ipynb",
            new_markdown_cell(f"# {me}"),
            new_code_cell(MEET.format(folder=str(tmp_path), me=me, other=other)),
            new_code_cell(f"print('{me} done')"),
        )
    out = tmp_path / "build"
    runs = build(tmp_path, out=out, jobs=2, screenshot=False)
    assert [(run.path.name, run.ok) for run in runs] == [("01_a.ipynb", True), ("02_b.ipynb", True)]
    # each notebook's cell times are recorded, code cells only (cell 0 is Markdown)
    for run in runs:
        assert run.cells is not None and sorted(run.cells) == [1, 2]
    ledger = json.loads((out / "runs.json").read_text())
    assert [entry["page"] for entry in ledger] == ["01_a.html", "02_b.html"]
    assert [sorted(entry["cells"]) for entry in ledger] == [["1", "2"], ["1", "2"]]
    assert all(entry["cells"]["1"] >= 0 for entry in ledger)
    index = (out / "index.html").read_text()
    assert index.index("<h2>01_a</h2>") < index.index("<h2>02_b</h2>")


def _timed(*seconds: float) -> nbformat.NotebookNode:
    """A notebook whose code cells recorded these run times (as nbclient records them)."""
    cells = [new_markdown_cell("# timed")]
    for elapsed in seconds:
        cell = new_code_cell("pass")
        cell.metadata["execution"] = {
            "iopub.execute_input": "2026-01-02T10:00:00.000000Z",
            "shell.execute_reply": f"2026-01-02T10:00:{elapsed:09.6f}Z",
        }
        cells.append(cell)
    cells.append(new_code_cell("never ran"))  # no timestamps: left out
    return new_notebook(cells=cells)


def test_cell_times_come_from_the_recorded_timestamps() -> None:
    assert cell_seconds(_timed(1.5, 0.25)) == {1: 1.5, 2: 0.25}
    assert cell_seconds(new_notebook(cells=[new_code_cell("x = 1")])) == {}


def test_the_longest_notebooks_start_first_ties_in_reading_order() -> None:
    notebooks = {
        Path("00_short.ipynb"): _timed(2.0),
        Path("01_long.ipynb"): _timed(30.0, 10.0),
        Path("02_never_run.ipynb"): new_notebook(cells=[new_code_cell("x = 1")]),
        Path("03_middle.ipynb"): _timed(5.0, 4.0),
        Path("04_short_too.ipynb"): _timed(1.0, 1.0),
    }
    assert [path.stem for path in longest_first(notebooks)] == [
        "01_long", "03_middle", "00_short", "04_short_too", "02_never_run"
    ]  # fmt: skip


def test_build_refuses_a_pool_of_no_kernels(course: Path) -> None:
    with pytest.raises(ValueError, match="jobs"):
        build(course, jobs=0)
    with pytest.raises(ValueError, match="timeout"):
        build(course, timeout=0)


ALONE = """\
import pathlib
here = pathlib.Path({folder!r})
(here / "alone.began").touch()
x = sum(range(10**6))
(here / "alone.ended").touch()"""


@pytest.mark.timeout(240)
def test_a_notebook_that_asks_to_run_alone_runs_first_with_no_kernel_beside_it(
    tmp_path: Path,
) -> None:
    notebooks = tmp_path / "notebooks"
    for me, other in (("01_a", "03_b"), ("03_b", "01_a")):
        _write(
            notebooks / f"{me}.ipynb",
            new_markdown_cell(f"# {me}"),
            new_code_cell(MEET.format(folder=str(tmp_path), me=me, other=other)),
        )
    alone = _write(
        notebooks / "02_alone.ipynb",
        new_markdown_cell("# 02 · Timing claims"),
        new_code_cell(ALONE.format(folder=str(tmp_path))),
    )
    nb = nbformat.read(alone, as_version=4)
    nb.metadata["course"] = {"run_alone": True}
    nbformat.write(nb, alone)
    assert runs_alone(nb) and not runs_alone(nbformat.read(notebooks / "01_a.ipynb", 4))

    runs = build(tmp_path, out=tmp_path / "build", jobs=2, screenshot=False)
    assert [(run.path.stem, run.ok, run.error) for run in runs] == [
        ("01_a", True, ""),
        ("02_alone", True, ""),
        ("03_b", True, ""),
    ]
    # it ran first, and no other notebook began before it ended
    ended = (tmp_path / "alone.ended").stat().st_mtime_ns
    began = sorted(p.stat().st_mtime_ns for p in tmp_path.glob("*.started"))
    assert len(began) == 2 and ended <= began[0]
