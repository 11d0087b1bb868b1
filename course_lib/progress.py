"""Progress bars that show while a cell runs and leave nothing in the saved notebook.

In a Jupyter kernel the bar is one display line, updated in place and emptied when the bar
closes, so the saved output, its HTML page and its slides carry no progress frames (tqdm's
text bar would leave every frame in the cell's stderr). Elsewhere (a terminal, a test, a
benchmark) it is tqdm's ordinary bar on stderr.
"""

from __future__ import annotations

import io
import sys
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["in_kernel", "progress"]

T = TypeVar("T")


class _DisplayLine(io.TextIOBase):
    """A file tqdm writes its frames to, shown as one updatable display output."""

    def __init__(self) -> None:
        from IPython.display import display

        self._id = f"progress-{uuid.uuid4().hex}"
        display({"text/plain": ""}, raw=True, display_id=self._id)

    def _show(self, text: str) -> None:
        from IPython.display import update_display

        update_display({"text/plain": text}, raw=True, display_id=self._id)

    def write(self, s: str) -> int:
        frame = s.rsplit("\r", 1)[-1].strip()
        if frame:
            self._show(frame)
        return len(s)

    def flush(self) -> None:
        """Nothing is buffered: every frame is shown as it is written."""

    def close(self) -> None:
        self._show("")
        super().close()


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (where outputs are saved in a notebook)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the course
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


class _Bar(tqdm):
    """tqdm that empties its display line when it closes."""

    def close(self) -> None:
        # tqdm calls close() from __del__ too, also on a bar whose __init__ stopped early
        fp = getattr(self, "fp", None)
        line = fp if isinstance(fp, _DisplayLine) else None
        super().close()
        if line is not None and not line.closed:
            line.close()


def progress(iterable: Iterable[T] | None = None, /, **options: Any) -> tqdm:
    """A tqdm bar (same arguments) that leaves no frames in a notebook's saved output."""
    if "file" in options:
        raise TypeError("progress: the bar picks its own output; do not pass file=")
    if in_kernel() and not options.get("disable", False):
        file: Any = _DisplayLine()
    else:
        file = sys.stderr
    options.setdefault("leave", False)
    return _Bar(iterable, file=file, **options)
