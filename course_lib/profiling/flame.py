"""Flame graphs from a sampling profiler's collapsed stacks (``py-spy record --format raw``).

The collapsed format has one line per distinct stack, root first, frames separated by ``;``,
then a space and the number of samples: ``main (app.py:3);handler (app.py:9) 42``.
:func:`read_collapsed` parses it, keeping each frame's function name and file but not its
line, so samples of one function merge. :func:`stack_share` is the fraction of samples whose
stack passes through a function (what a sampler says that function costs, callees
included). :func:`flame_graph` draws the stacks as an icicle: one row per stack depth, each
box as wide as its share of samples, callers above callees.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from course_lib.charts import color, new_figure

__all__ = ["Stacks", "flame_graph", "read_collapsed", "stack_share"]

Stacks = Mapping[tuple[str, ...], int]
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _frame(raw: str) -> str:
    match = _FRAME.match(raw.strip())
    if not match:
        return raw.strip()
    return f"{match['name']} ({match['file']})"


def read_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """Samples per stack (tuple of ``"function (file)"``, root first) from collapsed text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    stacks: Counter[tuple[str, ...]] = Counter()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        frames, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"text: line {number} is not 'frame;frame;... count': {line[:80]!r}")
        # an empty stack: samples taken while no Python frame ran (start-up, exit)
        stacks[tuple(_frame(f) for f in frames.split(";") if f.strip())] += int(count)
    return stacks


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _under(stacks: Stacks, root: str | None) -> Counter[tuple[str, ...]]:
    """The stacks passing through ``root`` (by function name), cut to start at it."""
    if root is None:
        return Counter(dict(stacks))
    cut: Counter[tuple[str, ...]] = Counter()
    for stack, count in stacks.items():
        names = [_name(f) for f in stack]
        if root in names:
            cut[stack[names.index(root) :]] += count
    return cut


def stack_share(stacks: Stacks, function: str, *, root: str | None = None) -> float:
    """Fraction of the samples (under ``root``, if given) whose stack contains ``function``."""
    selected = _under(stacks, root)
    total = sum(selected.values())
    if not total:
        raise ValueError(f"no samples{f' under {root!r}' if root else ''}")
    hits = sum(c for s, c in selected.items() if function in (_name(f) for f in s))
    return hits / total


def _package(frame: str) -> str:
    file = frame.rsplit(" (", 1)[-1].rstrip(")")
    return file.split("/", 1)[0] if "/" in file else "python"


# at fontsize 7 on the 11-inch figure, one character is about 0.75 % of the axis width
_CHAR_SHARE = 0.75


def _fit(name: str, width: float) -> str:
    """``name`` cut to what fits in a box ``width`` % wide ("" if not even 4 characters)."""
    room = int((width - 0.8) / _CHAR_SHARE)
    if room < 4:
        return ""
    return name if len(name) <= room else name[: room - 1] + "…"


def flame_graph(
    stacks: Stacks,
    *,
    root: str | None = None,
    title: str = "",
    max_depth: int = 14,
    min_share: float = 0.005,
) -> Figure:
    """Icicle chart of ``stacks`` (under ``root``): boxes coloured by top-level package,
    labelled with the function name where wide enough. Boxes under ``min_share`` of the
    samples and frames deeper than ``max_depth`` are not drawn."""
    selected = _under(stacks, root)
    total = sum(selected.values())
    if not total:
        raise ValueError(f"no samples{f' under {root!r}' if root else ''}")
    fig, (ax,) = new_figure(
        title or f"{total} samples", xlabel="share of samples (%)", ylabel="stack depth"
    )
    fig.set_size_inches(11, 5.5)
    packages: dict[str, str] = {}

    def draw(prefix: tuple[str, ...], left: float) -> None:
        depth = len(prefix)
        if depth >= max_depth:
            return
        children: Counter[str] = Counter()
        for stack, count in selected.items():
            if len(stack) > depth and stack[:depth] == prefix:
                children[stack[depth]] += count
        for frame in sorted(children):
            width = children[frame] / total * 100
            if width >= min_share * 100:
                package = _package(frame)
                packages[package] = color(package)
                ax.barh(-depth, width, left=left, height=0.92, color=color(package))
                label = _fit(_name(frame), width)
                if label:
                    ax.text(left + 0.4, -depth, label, va="center", fontsize=7, clip_on=True)
                draw((*prefix, frame), left)
            left += width

    draw((), 0.0)
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.grid(False, axis="y")
    ax.legend(  # outside the axes, so no box is hidden under it
        handles=[Patch(color=c, label=p) for p, c in packages.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    return fig
