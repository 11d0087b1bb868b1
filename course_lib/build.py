"""Execute the course's notebooks and publish them as HTML (``course build``).

Guarantees: notebooks run in order (``notebooks/NN_*.ipynb``, then ``notebooks/solutions``),
each in a fresh kernel of the current Python, against the services of
:mod:`course_lib.services`; every notebook is attempted even after one fails; the result
names the failing notebook and cell. Output under ``build/``: the executed ``.ipynb``, one
``.html`` per notebook and an ``index.html`` with each notebook's title, status and run time
(of its latest build, kept in ``build/runs.json``, so building one notebook keeps the others'
rows).
With ``inplace`` the executed notebooks are written back over the sources instead, which is
how the committed outputs are regenerated.
"""

from __future__ import annotations

import contextlib
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

__all__ = ["NotebookRun", "build", "discover", "notebook_title"]


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
        client.execute()
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


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root.resolve() / "notebooks")
    except ValueError:
        return Path(path.name)


def _record(runs: list[NotebookRun], root: Path, out: Path) -> list[dict[str, object]]:
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
        }
    ordered = sorted(entries.values(), key=lambda e: (str(e["page"]).count("/"), e["page"]))
    ledger.write_text(json.dumps(ordered, indent=1), encoding="utf-8")
    return ordered


def _index(entries: list[dict[str, object]]) -> str:
    rows = []
    for entry in entries:
        ok = bool(entry["ok"])
        status = "ok" if ok else f"FAILED at cell {entry['failed_cell']}: {entry['error']}"
        rows.append(
            f"<tr><td><a href='{html.escape(str(entry['page']))}'>"
            f"{html.escape(str(entry['title']))}</a></td>"
            f"<td class='{'ok' if ok else 'fail'}'>{html.escape(status)}</td>"
            f"<td>{entry['seconds']} s</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>perf-course</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.3em 1em;text-align:left}"
        ".ok{color:#2ca02c}.fail{color:#d62728}</style></head><body>"
        "<h1>perf-course: backend performance and concurrency in Python</h1>"
        "<table><tr><th>notebook</th><th>status</th><th>run time</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def build(
    root: Path,
    notebooks: list[Path] | None = None,
    *,
    out: Path | None = None,
    inplace: bool = False,
    timeout: int = 600,
) -> list[NotebookRun]:
    """Execute ``notebooks`` (default: :func:`discover`) and write the results; see module doc.

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
    with tqdm(total=total, unit="cell", desc="notebooks") as bar:
        for path in paths:
            bar.set_postfix_str(path.name)
            nb, run = _execute(path, timeout, bar)
            runs.append(run)
            if inplace:
                nbformat.write(nb, path)
                continue
            target = out / _relative(path, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, target)
            target.with_suffix(".html").write_text(_html(nb), encoding="utf-8")
    if not inplace:
        (out / "index.html").write_text(_index(_record(runs, root, out)), encoding="utf-8")
    return runs
