"""The course's prose holds against its own run (issue: "every sentence holds").

Mechanisms, each a test here:
- A number typed in a notebook's Markdown or its instructor page is an input the notebook's
  code sets (a literal in a code cell), never a measured figure: measured figures are
  rendered by :func:`course_lib.narrate.say` and reach instructor pages as ``{{ name }}``.
- Every instructor page renders from the figures its committed notebook recorded.
- A chart's headline is set only through :func:`course_lib.charts.claim`, which asserts it.
- No progress-bar frames in saved outputs (bars go through :mod:`course_lib.progress`).
- Chart cells can run again after the notebook ran: ``notebooks/conftest.py`` re-runs them
  under nbval.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import comment_markers

from course_lib.build import fill_instructor_page
from course_lib.narrate import figures_of

pytestmark = pytest.mark.one_pass

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))
INSTRUCTOR = ROOT / "notebooks" / "instructor"

# A number: digits with optional thousands separators and decimals, not glued to a letter
# or digit before it (p99, h11, utf-8 and x86_64 are names, not figures).
NUMBER = re.compile(r"(?<![\w.\-/:])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
# Names that carry a version or a standard's number: "RFC 9112", "Python 3.11", "HTTP/1.1".
VERSIONED = re.compile(
    r"\b(RFC|PEP|HTTP/?|Python|CPython|PostgreSQL|Redis|redis-py|SQLAlchemy|nginx|psycopg|"
    r"RQ|Lua|Starlette|uvicorn|OpenTelemetry|JupyterLab|pgbouncer|PgBouncer|Debian|IPv)"
    r"\s?\d[\d.]*",
)
HTTP_STATUS = {"200", "201", "204", "301", "302", "304", "400", "404", "409", "429", "500"}
HTTP_STATUS |= {"502", "503", "504"}
# A small count (0-10) is prose ("two threads", "step 1", "N+1") unless a unit says it was
# measured: "7x", "3 ms", "5 %".
UNIT_AFTER = re.compile(r"\s?(x\b|×|%|ms\b|us\b|µs\b|s\b|seconds?\b|req/s|requests/s|MB\b)")


def _strip(markdown: str) -> str:
    """Markdown without what is not prose: link targets, URLs, section numbers of headings,
    HTML comments and Jinja fields (``{{ name }}``, filled from the run)."""
    text = re.sub(r"\{\{.*?\}\}", " ", markdown, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "] ", text)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"^(#+\s*)[\d.]+\s", r"\1", text, flags=re.M)
    return VERSIONED.sub(" ", text)


def _literal(token: str) -> str:
    """A numeric token in one spelling: no separators, no trailing zeros after a point."""
    token = token.replace(",", "").replace("_", "")
    if "." in token:
        token = token.rstrip("0").rstrip(".") or "0"
    return token.lstrip("0") or "0"


def code_literals(nb: nbformat.NotebookNode) -> set[str]:
    """Every number written in the notebook's code cells (its inputs)."""
    found = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            for match in re.finditer(r"(?<![\w.])(\d[\d_]*)(\.\d+)?", cell.source):
                found.add(_literal(match.group(0)))
    return found


def section_numbers(nb: nbformat.NotebookNode) -> set[str]:
    """The notebook's section numbers (``## 1.2 ...``), which prose may refer to."""
    found = set()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for match in re.finditer(r"^#+\s*([\d.]*\d)\s", cell.source, flags=re.M):
                found.add(match.group(1))
    return found


def typed_figures(prose: str, allowed: set[str], sections: set[str]) -> list[str]:
    """Numbers in ``prose`` that are neither inputs (``allowed``) nor section numbers,
    nor small counts used as words, nor HTTP statuses, nor notebook numbers ("03")."""
    text = _strip(prose)
    typed = []
    for match in NUMBER.finditer(text):
        token = match.group(0)
        # A section reference such as 3.1.4 or a notebook number such as 03.
        following = text[match.end() : match.end() + 3]
        if re.match(r"\.\d", following) or token in sections:
            continue
        if re.fullmatch(r"0\d|(19|20)\d\d", token):  # a notebook number, a year
            continue
        if re.search(
            r"(Exercise|exercise|ex\.?)\s$", text[max(0, match.start() - 9) : match.start()]
        ):
            continue
        if token in HTTP_STATUS or _literal(token) in allowed:
            continue
        small = "." not in token and int(token.replace(",", "")) <= 10
        if small and not UNIT_AFTER.match(text, match.end()):
            continue
        start = max(0, match.start() - 30)
        typed.append(f"{token!r} in ...{text[start : match.end() + 20]!r}...")
    return typed


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_notebook_prose_types_no_measured_figure(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    allowed = code_literals(nb)
    sections = section_numbers(nb)
    typed = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            typed += [f"cell {index}: {t}" for t in typed_figures(cell.source, allowed, sections)]
    assert not typed, "numbers typed into prose (render them with narrate.say):\n" + "\n".join(
        typed
    )


@pytest.mark.parametrize("path", sorted(INSTRUCTOR.glob("[0-9][0-9]_*.md")), ids=lambda p: p.stem)
def test_instructor_page_quotes_only_its_run(path: Path) -> None:
    notebook = ROOT / "notebooks" / f"{path.stem}.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    template = path.read_text(encoding="utf-8")
    # Renders from the committed run's figures: a field the run did not record fails here.
    fill_instructor_page(template, figures_of(nb))
    # Planned minutes per section are the teacher's plan, not a measurement.
    prose = re.sub(r"\d+\s?(minutes|min)\b", " ", template)
    prose = re.sub(r"^\|.*\|\s*\d+\s*\|.*$", " ", prose, flags=re.M)
    typed = typed_figures(prose, code_literals(nb), section_numbers(nb))
    assert not typed, "numbers typed into the instructor page (use {{ figure }}):\n" + "\n".join(
        typed
    )


def test_typed_figures_catches_what_the_issue_found() -> None:
    allowed = {"5", "100"}
    found = typed_figures(
        "One Redis bucket: 19. The limit is 5, 100 clients, see 3.1.4. About 40 s, 1.02x, "
        "a 30 ms request, two threads, N+1, HTTP 429, Python 3.11, RFC 9112, 7x slower.",
        allowed,
        {"3.1.4"},
    )
    assert [f.split("'")[1] for f in found] == ["19", "40", "1.02", "30", "7"]


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_chart_headlines_go_through_claim(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    bad = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for match in re.finditer(
            r"\btitle=(?!\s*(charts\.)?claim\()|suptitle\(|plt\.title\(", cell.source
        ):
            bad.append(f"cell {index}: {cell.source[match.start() : match.start() + 60]!r}")
    assert not bad, "chart titles must be charts.claim(text, holds=...):\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_every_nbval_marker_is_one_nbval_reads(path: Path) -> None:
    # nbval matches a comment line against its markers exactly: "# NBVAL_IGNORE_OUTPUT (why)"
    # is no marker, and the cell's volatile output is then compared.
    nb = nbformat.read(path, as_version=4)
    bad = [
        f"cell {index}: {line.strip()!r}"
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if line.strip().startswith("#")
        and "NBVAL" in line
        and line.strip().lstrip("#").strip() not in comment_markers
    ]
    assert not bad, "comments nbval does not read as markers:\n" + "\n".join(bad)


PROGRESS_FRAME = re.compile(r"\d+%\|.*\||\d+/\d+ \[\d+:\d+")


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_saved_outputs_carry_no_progress_frames(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    frames = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            if PROGRESS_FRAME.search(text):
                frames.append(f"cell {index}: {text[:80]!r}")
    assert not frames, "progress frames in saved outputs:\n" + "\n".join(frames)


def test_every_recorded_figure_is_read_back_once() -> None:
    for path in NOTEBOOKS:
        figures_of(nbformat.read(path, as_version=4))  # raises on a conflicting name
