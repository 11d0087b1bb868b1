"""Execute the course's notebooks and publish them as HTML (``course build``).

Guarantees: notebooks run in order (``notebooks/NN_*.ipynb``, then ``notebooks/solutions``),
each in a fresh kernel of the current Python, against the services of
:mod:`course_lib.services`; every notebook is attempted even after one fails; the result
names the failing notebook and cell. Output under ``build/``: the executed ``.ipynb`` and one
``.html`` per notebook; for each course notebook (not the solutions) reveal.js slides
(``NN_topic.slides.html``, slide types from the cells' ``slideshow`` metadata, or defaults, see
:func:`with_default_slides`) and the PNG of its cell tagged ``key-chart`` (``thumbs/``); the
instructor pages ``notebooks/instructor/NN_topic.md`` as ``instructor/NN_topic.html``; and the
landing page ``index.html``: per notebook its title, goals (its first cell's bullets), status,
run time, date, the servers it ran against, its key chart, and links to its page, slides,
instructor page and solutions (of each notebook's latest build, kept in ``build/runs.json``,
so building one notebook keeps the others' cards). The landing page is static HTML with
inline CSS and no external assets; the slides load reveal.js from a CDN when opened.
With ``inplace`` the executed notebooks are written back over the sources instead, which is
how the committed outputs are regenerated.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

from .narrate import Figure, figures_of

__all__ = [
    "NotebookRun",
    "build",
    "discover",
    "fill_instructor_page",
    "key_chart",
    "notebook_goals",
    "notebook_title",
    "render_markdown_page",
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


def _failed_cell(nb: nbformat.NotebookNode) -> tuple[int | None, str]:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, f"{output.get('ename')}: {output.get('evalue')}".strip()
    return None, ""


def _execute(path: Path, timeout: int, bar: tqdm) -> tuple[nbformat.NotebookNode, NotebookRun]:
    nb = nbformat.read(path, as_version=4)
    title = notebook_title(nb, path.stem)
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
        return nb, NotebookRun(path, title, True, time.perf_counter() - start)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        index, error = _failed_cell(nb)
        if index is None:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return nb, NotebookRun(path, title, False, time.perf_counter() - start, index, error)


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


def with_default_slides(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` with slide types for reveal.js; the notebook's own are kept if it has
    any. Defaults: every Markdown heading starts a slide; prose right under a heading stays on
    its slide, prose after code starts a sub-slide (the next step of the section, below it); a
    code cell whose output is a chart gets a sub-slide of its own; other code cells appear as
    fragments of the current slide."""
    copy = nbformat.from_dict(json.loads(json.dumps(nb)))
    if any("slide_type" in c.get("metadata", {}).get("slideshow", {}) for c in copy.cells):
        return copy
    previous = ""
    for cell in copy.cells:
        if cell.cell_type == "markdown":
            if cell.source.lstrip().startswith("#"):
                kind = "slide"
            else:
                kind = "subslide" if previous == "code" else "-"
        elif any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            kind = "subslide"
        else:
            kind = "fragment"
        cell.metadata["slideshow"] = {"slide_type": kind}
        previous = cell.cell_type
    return copy


def _slides(nb: nbformat.NotebookNode) -> str:
    """reveal.js slides of ``nb``. Nothing is fetched while exporting; the page loads reveal.js
    (nbconvert's default ``reveal_url_prefix``, unpkg.com), require.js and jQuery from CDNs when
    it is opened."""
    from nbconvert import SlidesExporter

    exporter = SlidesExporter(
        reveal_scroll=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(with_default_slides(nb))
    return body


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
            **details.get(run.path, {}),
        }
    ordered = sorted(entries.values(), key=lambda e: (str(e["page"]).count("/"), e["page"]))
    ledger.write_text(json.dumps(ordered, indent=1), encoding="utf-8")
    return ordered


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}"
    "h1{margin-bottom:.2em}.meta{color:#666}.card{border:1px solid #ddd;border-radius:6px;"
    "padding:1em 1.2em;margin:1.2em 0;display:flex;gap:1.5em}.card .text{flex:1}"
    ".card h2{margin:0 0 .4em}.thumb img{width:20em;border:1px solid #eee}"
    ".ok{color:#2ca02c}.fail{color:#d62728}.links a{margin-right:1em}"
    "code{background:#f4f4f4;padding:0 .2em}ul{margin:.3em 0}"
)


def _inline(text: str) -> str:
    """Escape ``text`` and render its inline Markdown: ``code``, **bold**, *italics*,
    [links](url)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", out)


def _status(entry: dict[str, object]) -> str:
    if entry["ok"]:
        return f"<span class='ok'>ok</span>, ran in {entry['seconds']} s"
    failure = f"FAILED at cell {entry['failed_cell']}: {entry['error']}"
    return f"<span class='fail'>{html.escape(failure)}</span> after {entry['seconds']} s"


def _card(entry: dict[str, object], solutions: dict[str, object] | None) -> str:
    page = str(entry["page"])
    links = [f"<a href='{html.escape(page)}'>notebook</a>"]
    for key, label in (("slides", "slides"), ("instructor", "instructor page")):
        if entry.get(key):
            links.append(f"<a href='{html.escape(str(entry[key]))}'>{label}</a>")
    if solutions is not None:
        links.append(
            f"<a href='{html.escape(str(solutions['page']))}'>solutions</a> ({_status(solutions)})"
        )
    goals = "".join(f"<li>{_inline(goal)}</li>" for goal in entry.get("goals", []))
    services_used = ", ".join(str(s) for s in entry.get("services", [])) or "not recorded"
    thumb = (
        f"<div class='thumb'><a href='{html.escape(page)}'>"
        f"<img src='{html.escape(str(entry['thumb']))}' alt='key chart'></a></div>"
        if entry.get("thumb")
        else ""
    )
    return (
        f"<div class='card'><div class='text'><h2>{html.escape(str(entry['title']))}</h2>"
        f"<div>{_status(entry)}; built {html.escape(str(entry.get('built', '?')))}</div>"
        f"<div class='meta'>ran against: {html.escape(services_used)}</div>"
        + (f"<ul>{goals}</ul>" if goals else "")
        + f"<div class='links'>{' '.join(links)}</div></div>{thumb}</div>"
    )


def _index(entries: list[dict[str, object]], unlisted: list[tuple[str, str]], today: str) -> str:
    """The landing page: one card per notebook (its solutions on the same card), then the
    instructor pages of notebooks without a card. Static, with no external assets."""
    notebooks = [e for e in entries if "/" not in str(e["page"])]
    solutions = {str(e["page"]): e for e in entries if "/" in str(e["page"])}
    cards = []
    for entry in notebooks:
        stem = str(entry["page"]).removesuffix(".html")
        cards.append(_card(entry, solutions.pop(f"solutions/{stem}_solutions.html", None)))
    cards += [_card(entry, None) for entry in solutions.values()]
    upcoming = "".join(
        f"<li><a href='{html.escape(link)}'>{html.escape(title)}</a></li>"
        for title, link in unlisted
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>perf-course</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>perf-course: backend performance and concurrency in Python</h1>"
        f"<p class='meta'>Course page built {html.escape(today)}. Each notebook: its goals, "
        "its last build, the servers it ran against, its key chart; the slides and the "
        "instructor page are for teaching it live.</p>"
        + "".join(cards)
        + (
            f"<h2>Instructor pages of notebooks not built here yet</h2><ul>{upcoming}</ul>"
            if upcoming
            else ""
        )
        + "</body></html>"
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
        "services": list(services_used),
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
    from jinja2 import Environment, StrictUndefined

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


def build(
    root: Path,
    notebooks: list[Path] | None = None,
    *,
    out: Path | None = None,
    inplace: bool = False,
    timeout: int = 600,
    services_used: Sequence[str] = (),
) -> list[NotebookRun]:
    """Execute ``notebooks`` (default: :func:`discover`) and write the results; see module doc.

    ``services_used`` describes the servers the notebooks run against (``course build``
    passes each service's kind and version); the landing page shows it per notebook.
    Raises ``ValueError`` before running anything if a notebook is missing or ``timeout`` is
    not positive, and ``OSError`` if the output folder cannot be written.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
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
    total = sum(
        sum(c.cell_type == "code" for c in nbformat.read(p, as_version=4).cells) for p in paths
    )
    runs = []
    details: dict[Path, dict[str, object]] = {}
    with tqdm(total=total, unit="cell", desc="notebooks") as bar:
        for path in paths:
            bar.set_postfix_str(path.name)
            nb, run = _execute(path, timeout, bar)
            runs.append(run)
            if inplace:
                nbformat.write(nb, path)
                continue
            built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            details[path] = _publish(nb, path, root, out, services_used, built)
    if not inplace:
        entries = _record(runs, details, root, out)
        built = {str(e["page"]).removesuffix(".html") for e in entries}
        unlisted = _instructor_pages(root, out, built)
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        page = _index(entries, unlisted, today)
        (out / "index.html").write_text(page, encoding="utf-8")
    return runs
