"""Sentences that quote a measurement, rendered by the code that measured it.

A notebook never types a measured figure into its prose: a sentence that quotes one is the
output of :func:`say`, which formats it from the values the cell just measured and records
each value, under its name, in the output's metadata. ``course build`` reads those records
back from the executed notebook (:func:`figures_of`) and fills the instructor page with
them, so the page always quotes the run it sits next to.

Guarantees: the text a reader sees and the figure an instructor page quotes are the same
string (both are ``format(value, spec)`` with the spec written in the sentence); a name
recorded twice in one notebook with two different texts is an error when the figures are
read back (:func:`figures_of` raises ``ValueError``), never a silent pick of one.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .progress import in_kernel

if TYPE_CHECKING:  # nbformat imports jsonschema, seconds of imports a notebook's kernel skips
    import nbformat

__all__ = ["METADATA_KEY", "Figure", "figures_of", "record", "say"]

# Key of the output metadata that carries a cell's recorded figures.
METADATA_KEY = "course_figures"


@dataclass(frozen=True)
class Figure:
    """One recorded measurement: its value and the text it was shown as."""

    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can store it (NumPy scalars become Python numbers)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def _fields(template: str) -> dict[str, str]:
    """Each field of a ``str.format`` template and its format spec (one spec per name)."""
    specs: dict[str, str] = {}
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template: field {name!r} must be a plain name")
        if conversion:
            raise ValueError(f"template: field {name!r} uses a conversion; use a format spec")
        if name in specs and specs[name] != spec:
            raise ValueError(f"template: field {name!r} appears with two format specs")
        specs[name] = spec or ""
    return specs


def _records(figures: Mapping[str, Any], specs: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    return {
        name: {"value": _jsonable(value), "text": format(value, specs.get(name, ""))}
        for name, value in figures.items()
    }


def _display(data: dict[str, str], records: dict[str, dict[str, Any]]) -> None:
    from IPython.display import display

    display(data, raw=True, metadata={METADATA_KEY: records})


def say(template: str, /, **figures: Any) -> None:
    """Show ``template.format(**figures)`` as Markdown and record each figure.

    ``template`` is Markdown with ``str.format`` fields (``"{p99:.1f} ms"``); every field
    must be given and every figure used, so a sentence cannot quote a number it was not
    given. Outside a kernel the text is printed instead. Returns nothing, so a ``say`` at the
    end of a cell shows the sentence once.
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    specs = _fields(template)
    missing = sorted(set(specs) - set(figures))
    unused = sorted(set(figures) - set(specs))
    if missing:
        raise ValueError(f"template: no figure given for {', '.join(missing)}")
    if unused:
        raise ValueError(f"figures not quoted by the template: {', '.join(unused)}")
    text = template.format(**figures)
    records = _records(figures, specs)
    if in_kernel():
        _display({"text/markdown": text, "text/plain": text}, records)
    else:
        print(text)


def record(spec: str = "", /, **figures: Any) -> None:
    """Record figures an instructor page quotes without a sentence of the notebook's own
    (formatted with ``spec``, e.g. ``".1f"``). Shows nothing."""
    if not figures:
        raise ValueError("record: give at least one figure")
    records = _records(figures, dict.fromkeys(figures, spec))
    if in_kernel():
        _display({"text/plain": ""}, records)


def figures_of(nb: nbformat.NotebookNode) -> dict[str, Figure]:
    """Every figure an executed notebook recorded, by name.

    Raises ``ValueError`` if one name was recorded with two different texts.
    """
    found: dict[str, Figure] = {}
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            for name, item in output.get("metadata", {}).get(METADATA_KEY, {}).items():
                figure = Figure(item["value"], item["text"])
                if name in found and found[name].text != figure.text:
                    raise ValueError(
                        f"figure {name!r} recorded twice with different texts "
                        f"({found[name].text!r}, then {figure.text!r} in cell {index})"
                    )
                found[name] = figure
    return found
