"""Execute the course's notebooks and publish them as HTML (``course build``).

Guarantees: every notebook found runs (``notebooks/NN_*.ipynb``, then ``notebooks/solutions``:
a new notebook needs no edit here), each in a fresh kernel of the current Python, against the
services of :mod:`course_lib.services`; every notebook is attempted even after one fails; the
result names the failing notebook and cell. ``jobs`` kernels run side by side (2 by default,
one per core of the machine the course is built for): each notebook keeps its state apart
(Redis keys and a PostgreSQL schema named from a random run id, servers on ports the system
picks or on Unix sockets in folders of their own), so no two meet. A notebook whose claims
compare CPU timings round by round can ask to run alone (:func:`runs_alone`): those run
first, one at a time. The others start longest first (by the cell times of the committed
outputs), so the last to finish are short ones. The results, ``runs.json`` and the pages are
in reading order whatever order the notebooks finished in. ``runs.json`` keeps each
notebook's run time and the time of each of its code cells (from the execution timestamps
nbclient records in the cells' metadata).

Output under ``build/``: the executed ``.ipynb`` and one ``.html`` per notebook; for each
course notebook (not the solutions) reveal.js slides (``NN_topic.slides.html``, slide types
from the cells' ``slideshow`` metadata, or defaults, see :func:`with_default_slides`) and the
PNG of its cell tagged ``key-chart`` (``thumbs/``); the instructor pages
``notebooks/instructor/NN_topic.md`` as ``instructor/NN_topic.html``; and the landing page
``index.html`` (the Jinja template ``templates/landing/index.html.j2``): per notebook its
title, goals (its first cell's bullets), status, run time, date, session length (its
instructor page's ``**Session length:**`` line), the servers it used (:func:`servers_used`)
with their versions, its key chart (a click opens it full size), and links to its page,
slides, instructor page and solutions (of each notebook's latest build, kept in
``build/runs.json``, so building one notebook keeps the others' cards); and ``landing.png``,
a screenshot of it, where a Chromium is installed. The landing page is static HTML with
inline CSS and no external assets; the slides load reveal.js from ``build/reveal.js/``
(copied from the ``sphinx-revealjs`` package), so they work offline. With ``inplace`` the
executed notebooks are written back over the sources instead, which is how the committed
outputs are regenerated.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nbformat
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from markupsafe import Markup
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

from .narrate import Figure, figures_of
from .validation import positive_int

__all__ = [
    "NotebookRun",
    "build",
    "cell_seconds",
    "chromium_binary",
    "chromium_flags",
    "discover",
    "fill_instructor_page",
    "key_chart",
    "longest_first",
    "notebook_goals",
    "notebook_title",
    "render_markdown_page",
    "runs_alone",
    "servers_used",
    "session_length",
    "set_default_slides",
    "start_page",
    "with_default_slides",
]


@dataclass(frozen=True)
class NotebookRun:
    """Outcome of executing one notebook."""

    path: Path
    title: str
    ok: bool
    seconds: float
    failed_cell: int | None = None
    error: str = ""
    # each code cell's run time in seconds, by cell index (see :func:`cell_seconds`)
    cells: Mapping[int, float] | None = None

    def describe(self) -> str:
        if self.ok:
            return f"ok      {self.path} ({self.seconds:.1f} s)"
        return f"FAILED  {self.path} cell {self.failed_cell}: {self.error}"


def discover(root: Path) -> list[Path]:
    """The course's notebooks under ``root/notebooks``, in reading order."""
    folder = root / "notebooks"
    return sorted(folder.glob("[0-9][0-9]_*.ipynb")) + sorted(
        (folder / "solutions").glob("[0-9][0-9]_*.ipynb")
    )


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first Markdown heading of the notebook, without the ``#``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# the landing page's template and the offline slides' nbconvert template
_TEMPLATES = Path(__file__).parent / "templates"


def _failed_cell(nb: nbformat.NotebookNode) -> tuple[int | None, str]:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, f"{output.get('ename')}: {output.get('evalue')}".strip()
    return None, ""


def cell_seconds(nb: nbformat.NotebookNode) -> dict[int, float]:
    """How long each code cell of the executed notebook ``nb`` ran, in seconds, by cell index:
    from the kernel's ``execute_input`` to its ``execute_reply``, the timestamps nbclient
    records in each cell's ``execution`` metadata (also in the committed notebooks, which
    ``course build --inplace`` wrote). Cells without them (never run) are left out."""
    seconds = {}
    for index, cell in enumerate(nb.cells):
        stamps = cell.get("metadata", {}).get("execution", {})
        start, end = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
        if cell.cell_type == "code" and start and end:
            elapsed = datetime.fromisoformat(end) - datetime.fromisoformat(start)
            seconds[index] = round(elapsed.total_seconds(), 3)
    return seconds


def runs_alone(nb: nbformat.NotebookNode) -> bool:
    """Whether the notebook ``nb`` asks to run with no other kernel beside it: its metadata
    holds ``"course": {"run_alone": true}``. A notebook whose claims compare timings (the
    cost of a profiler round by round, latency tails through a live rig) asks for it: a
    kernel on the other core makes some runs slower than others for reasons the claim is not
    about."""
    return bool(nb.metadata.get("course", {}).get("run_alone", False))


def longest_first(notebooks: Mapping[Path, nbformat.NotebookNode]) -> list[Path]:
    """The order in which a pool of kernels starts ``notebooks``: the longest first, by the
    cell times recorded in each (:func:`cell_seconds`; a notebook never run counts as 0 s),
    ties in the given order. Started that way, the notebooks that finish last are short
    ones, so the pool's kernels finish close together (the classic LPT rule)."""
    order = list(notebooks)
    return sorted(order, key=lambda p: (-sum(cell_seconds(notebooks[p]).values()), order.index(p)))


class _RunningBar:
    """Shows on a progress bar the names of the notebooks being executed right now."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar
        self._names: list[str] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        with self._lock:
            self._names.append(name)
            self._bar.set_postfix_str(", ".join(self._names))
        try:
            yield
        finally:
            with self._lock:
                self._names.remove(name)
                self._bar.set_postfix_str(", ".join(self._names))


def _execute(
    path: Path, nb: nbformat.NotebookNode, timeout: int, bar: tqdm
) -> tuple[nbformat.NotebookNode, NotebookRun]:
    title = notebook_title(nb, path.stem)
    for cell in nb.cells:  # a cell the run does not reach must not keep an older run's times
        cell.metadata.pop("execution", None)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        # The kernel listens on loopback only; its warning about that is noise in a build log.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
        on_cell_executed=lambda **_: bar.update(1),
    )
    start = time.perf_counter()
    try:
        # Charts are the point of a build: the kernel draws inline even where the caller's
        # environment picked a non-interactive backend (MPLBACKEND=Agg, common on CI).
        client.execute(env={**os.environ, "MPLBACKEND": INLINE_BACKEND})
        elapsed = time.perf_counter() - start
        return nb, NotebookRun(path, title, True, elapsed, cells=cell_seconds(nb))
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        index, error = _failed_cell(nb)
        if index is None:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        elapsed = time.perf_counter() - start
        return nb, NotebookRun(path, title, False, elapsed, index, error, cell_seconds(nb))


def _html(nb: nbformat.NotebookNode) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


def notebook_goals(nb: nbformat.NotebookNode) -> list[str]:
    """The bullet points of the notebook's first Markdown cell (its learning goals)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            return [line[2:].strip() for line in cell.source.splitlines() if line.startswith("- ")]
    return []


def key_chart(nb: nbformat.NotebookNode) -> bytes | None:
    """The PNG output of the first code cell tagged ``key-chart`` (cell metadata ``tags``)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "key-chart" in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    return base64.b64decode(png)
    return None


# A code cell taller than this (source and text output, in lines) gets a sub-slide of its
# own: as a fragment it would push the slide's heading off the screen.
_TALL_CELL = 24


def _lines(cell: nbformat.NotebookNode) -> int:
    count = len(cell.source.splitlines())
    for output in cell.get("outputs", []):
        text = output.get("text") or output.get("data", {}).get("text/plain", "")
        count += len("".join(text).splitlines())
    return count


def _default_slide_type(cell: nbformat.NotebookNode, previous: str) -> str:
    if cell.cell_type == "markdown":
        if cell.source.lstrip().startswith("#"):
            return "slide"
        return "subslide" if previous == "code" else "-"
    if any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
        return "subslide"
    return "subslide" if _lines(cell) > _TALL_CELL else "fragment"


def _fill_slide_types(nb: nbformat.NotebookNode) -> int:
    """Give every cell of ``nb`` without a slide type the default one (see
    :func:`with_default_slides`), in place; return how many cells got one."""
    previous, filled = "", 0
    for cell in nb.cells:
        slideshow = cell.metadata.setdefault("slideshow", {})
        if "slide_type" not in slideshow:
            slideshow["slide_type"] = _default_slide_type(cell, previous)
            filled += 1
        previous = cell.cell_type
    return filled


def with_default_slides(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` in which every cell has a slide type; a cell's own is kept. Defaults:
    every Markdown heading starts a slide; prose right under a heading stays on its slide,
    prose after code starts a sub-slide (the next step of the section, below it); a code cell
    whose output is a chart, or that is taller than 24 lines with its text output, gets a
    sub-slide of its own; other code cells appear as fragments of the current slide. The same
    rule serves the static slides (``course build``) and the live slideshow in JupyterLab
    (RISE, once :func:`set_default_slides` wrote it)."""
    copy = nbformat.from_dict(json.loads(json.dumps(nb)))
    _fill_slide_types(copy)
    return copy


def set_default_slides(path: Path) -> int:
    """Write the default slide types (:func:`with_default_slides`) into the notebook file
    ``path``, for the cells that have none, so RISE presents the live notebook the way the
    static slides do. Only cell metadata changes: sources and outputs are untouched, and a
    second call changes nothing. Returns how many cells got a slide type."""
    nb = nbformat.read(path, as_version=4)
    filled = _fill_slide_types(nb)
    if filled:
        nbformat.write(nb, path)
    return filled


def _reveal_folder() -> Path:
    """reveal.js as the ``sphinx-revealjs`` package ships it (``dist/``, ``plugin/``)."""
    import sphinx_revealjs

    return Path(sphinx_revealjs.__file__).parent / "_static" / "revealjs"


# What the offline slides load: reveal.js itself, its notes plugin, and the white theme
# with the fonts it imports (nbconvert's default theme, "simple", imports web fonts).
_REVEAL_FILES = ("dist/reveal.js", "dist/reveal.css", "plugin/notes/notes.js")
_REVEAL_THEME = "white"


def _copy_reveal(out: Path) -> None:
    """Copy the reveal.js files the slides use into ``out/reveal.js``."""
    source, target = _reveal_folder(), out / "reveal.js"
    for name in _REVEAL_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    theme = Path("dist/theme")
    (target / theme).mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / theme / f"{_REVEAL_THEME}.css", target / theme)
    shutil.copytree(source / theme / "fonts", target / theme / "fonts", dirs_exist_ok=True)


def _slides(nb: nbformat.NotebookNode) -> str:
    """reveal.js slides of ``nb``, loading reveal.js from ``reveal.js/`` beside them (see
    :func:`_copy_reveal`) and nothing from the network (the template ``reveal_offline``)."""
    from nbconvert import SlidesExporter

    exporter = SlidesExporter(
        extra_template_basedirs=[str(_TEMPLATES)],
        template_name="reveal_offline",
        reveal_url_prefix="reveal.js",
        reveal_theme=_REVEAL_THEME,
        reveal_scroll=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(with_default_slides(nb))
    return body


# What a line of a notebook's code calls when it uses a server (``services.status()``, the
# status line every notebook prints, only reports on the servers and is not counted).
# ``stack(...)`` (not pandas' ``frame.stack()``) is notebook 06's rig: a Redis and a
# PostgreSQL primary and replica of its own, started from the same servers' binaries.
_SERVER_CALLS = {
    "redis": re.compile(
        r"\b(redis_client|redis_url|fail_fast_redis|fail_fast_async_redis|EmbeddedRedis)\s*\("
        r"|(?<![.\w])stack\s*\("
    ),
    "postgres": re.compile(
        r"\b(engine|schema_engine|database_url|unique_schema|EmbeddedPostgres)\s*\("
        r"|(?<![.\w])stack\s*\("
    ),
    "nginx": re.compile(r"\brun_nginx\s*\("),
}


def servers_used(nb: nbformat.NotebookNode) -> list[str]:
    """The servers the executed notebook ``nb`` used, among ``redis``, ``postgres`` and
    ``nginx``: a server counts when a code cell that ran (it has an execution count) calls,
    outside a comment, what connects to it or starts it (``services.redis_client()``,
    ``services.engine()``, ``run_nginx(...)``, ...). A notebook declares what it uses by
    using it; nothing is typed in by hand, and a run that stopped early claims only what it
    reached."""
    found = []
    code = [
        line.split("#", 1)[0]
        for cell in nb.cells
        if cell.cell_type == "code" and cell.get("execution_count") is not None
        for line in cell.source.splitlines()
    ]
    for server, call in _SERVER_CALLS.items():
        if any(call.search(line) for line in code):
            found.append(server)
    return found


def _nginx_version() -> str | None:
    """``nginx X.Y.Z`` of the nginx the course would start, or ``None`` if none is installed."""
    from .load_balancing.nginx import nginx_binary

    binary = nginx_binary()
    if binary is None:
        return None
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30)
    found = re.search(r"nginx/(\S+)", done.stderr + done.stdout)
    return f"nginx {found.group(1)}" if found else "nginx (version unknown)"


def _servers_line(used: Sequence[str], services_used: Sequence[str]) -> list[str]:
    """Each server ``used`` with its version: Redis and PostgreSQL from ``services_used``
    (``"redis 7.0.15 (local)"``, as ``course build`` passes them), nginx from its binary."""
    described = []
    for server in used:
        if server == "nginx":
            version = _nginx_version()
            described.append(
                f"{version} (compared with the course proxy)"
                if version
                else "nginx not installed (its comparison was skipped)"
            )
            continue
        match = [s for s in services_used if s.split(" ", 1)[0] == server]
        described += match or [server]
    return described


_SESSION_LENGTH = re.compile(r"\*\*Session length:\*\*\s*([^*]*)")


def session_length(markdown: str) -> str | None:
    """How long teaching the notebook takes, from its instructor page's ``**Session
    length:**`` line: the duration (``about 85 minutes``), and ``, as two sessions`` when the
    page says to split it. ``None`` if the page has no such line."""
    found = _SESSION_LENGTH.search(markdown)
    if not found:
        return None
    text = found.group(1)
    duration = re.search(r"(about |under |over )?\d+(\s*-\s*\d+)?\s*(minutes|min|hours?)", text)
    length = duration.group(0) if duration else text.split(".")[0].strip()
    sessions = re.search(r"\b(two|three|four|\d) sessions\b", text)
    return f"{length}, as {sessions.group(0)}" if sessions else length


def _session_lengths(root: Path) -> dict[str, str]:
    """Session length per notebook stem, from ``notebooks/instructor/*.md``."""
    lengths = {}
    for page in sorted((root / "notebooks" / "instructor").glob("[0-9][0-9]_*.md")):
        length = session_length(page.read_text(encoding="utf-8"))
        if length:
            lengths[page.stem] = length
    return lengths


def render_markdown_page(markdown: str) -> str:
    """A Markdown document (an instructor page) as a standalone HTML page, through the same
    nbconvert exporter as the notebooks: one Markdown cell, no code."""
    from nbconvert import HTMLExporter

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(markdown)])
    title = notebook_title(nb, "Instructor page")
    nb.metadata["title"] = title
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root.resolve() / "notebooks")
    except ValueError:
        return Path(path.name)


def _record(
    runs: list[NotebookRun],
    details: dict[Path, dict[str, object]],
    root: Path,
    out: Path,
) -> list[dict[str, object]]:
    """Merge this run's results into ``out/runs.json``: the index shows every notebook's
    latest build, also after a build of only some notebooks."""
    ledger = out / "runs.json"
    entries: dict[str, dict[str, object]] = {}
    if ledger.exists():
        with contextlib.suppress(ValueError):
            entries = {e["page"]: e for e in json.loads(ledger.read_text())}
    for run in runs:
        page = str(_relative(run.path, root).with_suffix(".html"))
        entries[page] = {
            "page": page,
            "title": run.title,
            "ok": run.ok,
            "seconds": round(run.seconds, 1),
            "failed_cell": run.failed_cell,
            "error": run.error,
            # each code cell's run time, by cell index: where a notebook's time goes
            "cells": {str(index): seconds for index, seconds in (run.cells or {}).items()},
            **details.get(run.path, {}),
        }
    ordered = sorted(entries.values(), key=lambda e: (str(e["page"]).count("/"), e["page"]))
    ledger.write_text(json.dumps(ordered, indent=1), encoding="utf-8")
    return ordered


def _markdown_list(items: Sequence[str]) -> Markup:
    """``items`` (Markdown, as the notebook's author wrote them) as an HTML bullet list,
    rendered by nbconvert's Markdown renderer, the one the notebook pages use."""
    from nbconvert.filters import markdown2html

    return Markup(markdown2html("\n".join(f"- {item}" for item in items)))


def _landing_template() -> Template:
    environment = Environment(
        loader=FileSystemLoader(_TEMPLATES / "landing"),
        autoescape=True,
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    environment.filters["markdown_list"] = _markdown_list
    return environment.get_template("index.html.j2")


def _last_run(entry: Mapping[str, object]) -> dict[str, object]:
    """What a card shows of a ledger entry's last run."""
    return {key: entry.get(key) for key in ("ok", "seconds", "failed_cell", "error")}


def _servers(entry: Mapping[str, object]) -> str:
    """The card's servers: those the notebook used (:func:`servers_used`)."""
    if "servers" not in entry:  # a ledger entry from before servers were detected
        return "not recorded (build it again)"
    servers = ", ".join(str(s) for s in entry["servers"])  # type: ignore[attr-defined]
    return servers or "none of Redis, PostgreSQL or nginx"


def _card(
    entry: Mapping[str, object], solutions: Mapping[str, object] | None, length: str | None
) -> dict[str, object]:
    """What the landing page's card of one notebook (a ledger entry) shows."""
    answers = None
    if solutions is not None:
        answers = {"page": solutions["page"], "run": _last_run(solutions)}
    return {
        "title": entry["title"],
        "page": entry["page"],
        "run": _last_run(entry),
        "built": entry.get("built", "?"),
        "length": length,
        "servers": _servers(entry),
        "goals": entry.get("goals", []),
        **{key: entry.get(key) for key in ("slides", "instructor", "thumb")},
        "solutions": answers,
    }


def _index(
    entries: list[dict[str, object]],
    unlisted: list[tuple[str, str]],
    today: str,
    lengths: Mapping[str, str] | None = None,
) -> str:
    """The landing page (the template ``templates/landing/index.html.j2``): a pointer to
    where to start, one card per notebook (its solutions on the same card), then the
    instructor pages of notebooks without a card. Static, with no external assets."""
    notebooks = [e for e in entries if "/" not in str(e["page"])]
    solutions = {str(e["page"]): e for e in entries if "/" in str(e["page"])}
    cards = []
    for entry in notebooks:
        stem = str(entry["page"]).removesuffix(".html")
        answer = solutions.pop(f"solutions/{stem}_solutions.html", None)
        cards.append(_card(entry, answer, (lengths or {}).get(stem)))
    cards += [_card(entry, None, None) for entry in solutions.values()]
    return _landing_template().render(
        today=today, first=notebooks[0] if notebooks else None, cards=cards, unlisted=unlisted
    )


def _publish(
    nb: nbformat.NotebookNode,
    path: Path,
    root: Path,
    out: Path,
    services_used: Sequence[str],
    built: str,
) -> dict[str, object]:
    """Write the executed notebook, its HTML and (for a course notebook, not a solutions
    one) its slides, key-chart thumbnail and instructor page; return its ledger details."""
    relative = _relative(path, root)
    target = out / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    target.with_suffix(".html").write_text(_html(nb), encoding="utf-8")
    details: dict[str, object] = {
        "goals": notebook_goals(nb),
        "servers": _servers_line(servers_used(nb), services_used),
        "built": built,
    }
    if len(relative.parts) > 1:
        return details
    slides = relative.with_suffix(".slides.html")
    (out / slides).write_text(_slides(nb), encoding="utf-8")
    details["slides"] = str(slides)
    thumb = Path("thumbs") / relative.with_suffix(".png")
    png = key_chart(nb)
    if png is None:
        (out / thumb).unlink(missing_ok=True)
    else:
        (out / thumb).parent.mkdir(exist_ok=True)
        (out / thumb).write_bytes(png)
        details["thumb"] = str(thumb)
    instructor = root / "notebooks" / "instructor" / relative.with_suffix(".md")
    if instructor.is_file():
        details["instructor"] = str(Path("instructor") / relative.with_suffix(".html"))
    return details


def _with_links(markdown: str, stem: str, out: Path) -> str:
    """``markdown`` with a line of links under its title: the course page, and the notebook
    and its slides where this build folder has them (a teacher goes back and forth)."""
    links = ["[Course page](../index.html)"]
    for suffix, label in ((".html", "Notebook"), (".slides.html", "Slides")):
        if (out / f"{stem}{suffix}").exists():
            links.append(f"[{label}](../{stem}{suffix})")
    title, _, rest = markdown.partition("\n")
    return f"{title}\n\n{' · '.join(links)}\n{rest}"


def fill_instructor_page(template: str, figures: Mapping[str, Figure]) -> str:
    """An instructor page's Markdown with its ``{{ name }}`` fields filled from the figures
    its notebook recorded (:mod:`course_lib.narrate`): ``{{ name }}`` is the text the
    notebook showed, ``{{ name.value }}`` the value. A field the run did not record raises
    ``jinja2.UndefinedError`` naming it: a page cannot quote a figure the run did not make."""
    environment = Environment(undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template).render(**figures)


def _executed(stem: str, root: Path, out: Path) -> nbformat.NotebookNode | None:
    """The executed notebook ``stem``: this build folder's copy, else the committed one."""
    for path in (out / f"{stem}.ipynb", root / "notebooks" / f"{stem}.ipynb"):
        if path.is_file():
            return nbformat.read(path, as_version=4)
    return None


def _instructor_pages(root: Path, out: Path, built: set[str]) -> list[tuple[str, str]]:
    """Render every ``notebooks/instructor/*.md`` to ``out/instructor/*.html``, filled with
    the figures of its notebook's latest run (:func:`fill_instructor_page`); return
    (title, link) of those whose notebook has no card on the landing page (not written yet,
    or not built in this folder yet: ``built`` holds the stems that have one)."""
    unlisted = []
    for source in sorted((root / "notebooks" / "instructor").glob("[0-9][0-9]_*.md")):
        nb = _executed(source.stem, root, out)
        figures = figures_of(nb) if nb is not None else {}
        markdown = fill_instructor_page(source.read_text(encoding="utf-8"), figures)
        target = out / "instructor" / source.with_suffix(".html").name
        target.parent.mkdir(parents=True, exist_ok=True)
        page = render_markdown_page(_with_links(markdown, source.stem, out))
        target.write_text(page, encoding="utf-8")
        if source.stem not in built:
            title = notebook_title(
                nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(markdown)]),
                source.stem,
            )
            unlisted.append((title, f"instructor/{target.name}"))
    return unlisted


def chromium_binary() -> str | None:
    """A Chromium (or Chrome) on this machine, for the landing page's screenshot."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_flags(user_data_dir: Path) -> list[str]:
    """Flags for a headless Chromium that touches nothing but the page it is given: no GPU,
    no background traffic, a fresh profile; ``--no-sandbox`` only for root, where Chromium's
    sandbox refuses to start (containers)."""
    flags = [
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={user_data_dir}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.insert(1, "--no-sandbox")
    return flags


def _screenshot(page: Path, png: Path, size: tuple[int, int]) -> bool:
    """Save a screenshot of the local HTML file ``page`` as ``png`` with headless Chromium;
    ``False`` (and no file) where no Chromium is installed or it fails."""
    binary = chromium_binary()
    png.unlink(missing_ok=True)
    if binary is None:
        return False
    with tempfile.TemporaryDirectory(prefix="course-chromium-") as profile:
        command = [
            binary,
            *chromium_flags(Path(profile)),
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(command, capture_output=True, timeout=120, check=False)
    return png.is_file()


def start_page(root: Path, ledger: Path | None = None) -> str:
    """The course's start page in Markdown, for JupyterLab (``course lab`` opens it): the
    content of the landing page's cards, linking the notebooks themselves. Per notebook its
    title, goals, session length and run time (from ``ledger``, a build's ``runs.json``, when
    it has the notebook; else "not built yet")."""
    runs: dict[str, dict[str, object]] = {}
    if ledger is not None and ledger.is_file():
        with contextlib.suppress(ValueError):
            runs = {str(e["page"]): e for e in json.loads(ledger.read_text(encoding="utf-8"))}
    lengths = _session_lengths(root)
    lines = [
        "# perf-course: start here",
        "",
        "Run the notebooks in order, starting with **00 · Setup** (it checks the servers). "
        "To present one live, open it and press **Alt+R** (or the *Render as slides* button "
        "of its toolbar): the slideshow runs its cells live. The instructor notes are in "
        "`instructor/`.",
    ]
    for path in discover(root):
        if path.parent.name == "solutions":
            continue
        nb = nbformat.read(path, as_version=4)
        run = runs.get(f"{path.stem}.html")
        if run is None:
            ran = "not built yet (`course build`)"
        elif run.get("ok"):
            ran = f"ran in {run['seconds']} s on {run.get('built', '?')}"
        else:
            ran = f"last build FAILED at cell {run.get('failed_cell')}"
        length = lengths.get(path.stem)
        facts = [ran] + ([f"session length {length}"] if length else [])
        if run is not None and "servers" in run:
            servers = ", ".join(str(s) for s in run["servers"])  # type: ignore[attr-defined]
            facts.append(f"servers used: {servers or 'none of Redis, PostgreSQL or nginx'}")
        lines += ["", f"## [{notebook_title(nb, path.stem)}]({path.name})", ""]
        lines += [f"- {goal}" for goal in notebook_goals(nb)]
        lines += ["", f"*{'; '.join(facts)}.*"]
    return "\n".join(lines) + "\n"


def build(
    root: Path,
    notebooks: list[Path] | None = None,
    *,
    out: Path | None = None,
    inplace: bool = False,
    timeout: int = 600,
    jobs: int = 2,
    services_used: Sequence[str] = (),
    screenshot: bool = True,
) -> list[NotebookRun]:
    """Execute ``notebooks`` (default: :func:`discover`) and write the results; see module doc.

    ``jobs`` notebooks run at a time, the longest first (:func:`longest_first`), after those
    that ask to run alone (:func:`runs_alone`), one by one; ``jobs=1`` runs them all one by
    one in the given order. The runs come back in the given order.
    ``services_used`` describes the servers the notebooks run against (``course build``
    passes each service's kind and version); each card shows those its notebook used.
    ``screenshot``: save ``landing.png`` where a Chromium is installed.
    Raises ``ValueError`` before running anything if a notebook is missing, or ``timeout`` or
    ``jobs`` is not positive, and ``OSError`` if the output folder cannot be written.
    """
    timeout = positive_int("timeout", timeout)
    jobs = positive_int("jobs", jobs)
    paths = [p.resolve() for p in (notebooks or discover(root))]
    if not paths:
        raise ValueError(f"no notebooks found under {root / 'notebooks'}")
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            raise ValueError(f"not a notebook file: {path}")
    out = (out or root / "build").resolve()
    if not inplace:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    sources = {path: nbformat.read(path, as_version=4) for path in paths}
    if jobs == 1:  # one at a time anyway: in reading order
        alone, shared = [], paths
    else:
        alone = [path for path in paths if runs_alone(sources[path])]
        shared = longest_first({p: sources[p] for p in paths if p not in alone})
    total = sum(sum(c.cell_type == "code" for c in nb.cells) for nb in sources.values())
    with tqdm(total=total, unit="cell", desc="notebooks") as bar:
        progress = _RunningBar(bar)

        def run(path: Path) -> tuple[NotebookRun, dict[str, object]]:
            with progress.running(path.name):
                nb, result = _execute(path, sources[path], timeout, bar)
                if inplace:
                    nbformat.write(nb, path)
                    return result, {}
                built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
                return result, _publish(nb, path, root, out, services_used, built)

        results = {path: run(path) for path in alone}
        # A thread per kernel: nbclient drives each kernel from an event loop of the thread
        # that runs it. The pool starts the notebooks in the order they are submitted.
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook") as pool:
            futures = {path: pool.submit(run, path) for path in shared}
            results |= {path: future.result() for path, future in futures.items()}
    runs = [results[path][0] for path in paths]
    if not inplace:
        details = {path: results[path][1] for path in paths}
        if any("slides" in d for d in details.values()):
            _copy_reveal(out)
        entries = _record(runs, details, root, out)
        done = {str(e["page"]).removesuffix(".html") for e in entries}
        unlisted = _instructor_pages(root, out, done)
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        page = _index(entries, unlisted, today, _session_lengths(root))
        (out / "index.html").write_text(page, encoding="utf-8")
        if screenshot:
            # tall enough for every card (about 400 px each at this width)
            height = 400 + 400 * len(entries) + 30 * len(unlisted)
            _screenshot(out / "index.html", out / "landing.png", (1280, height))
    return runs
