"""An in-process cache that leaks, and its bounded fix.

A service memoises rendered pages in a module-level dict keyed by the full query string. Real
traffic carries tracking parameters (``?utm_source=...&ref=...``), so almost every key is new
and the dict grows for as long as the process lives: :class:`UnboundedPageCache`.
:class:`BoundedPageCache` keeps the ``maxsize`` most recently used pages (LRU) and counts
evictions; its memory stops growing once it is full. :func:`render_page` is where a page's
memory is allocated: the leak's allocation site.
"""

from __future__ import annotations

from collections import OrderedDict

from course_lib.validation import positive_int

__all__ = ["BoundedPageCache", "UnboundedPageCache", "query_strings", "render_page"]


def render_page(query: str) -> str:
    """The page for ``query``: about 2 KiB of text."""
    return f"<html><body><h1>{query}</h1>" + "<p>result</p>" * 150 + "</body></html>"


def query_strings(n: int, *, start: int = 0) -> list[str]:
    """``n`` distinct query strings: one listing, tracked by a different campaign id each."""
    return [f"/posts?page=1&utm_campaign=c{start + i}" for i in range(positive_int("n", n))]


class UnboundedPageCache:
    """``get(query)``: the cached page, rendered on a miss; never forgets anything."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}

    def get(self, query: str) -> str:
        page = self.pages.get(query)
        if page is None:
            page = self.pages[query] = render_page(query)
        return page


class BoundedPageCache:
    """``get(query)``: same, keeping only the ``maxsize`` most recently used pages."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = positive_int("maxsize", maxsize)
        self.pages: OrderedDict[str, str] = OrderedDict()
        self.evictions = 0

    def get(self, query: str) -> str:
        page = self.pages.get(query)
        if page is not None:
            self.pages.move_to_end(query)
            return page
        page = self.pages[query] = render_page(query)
        if len(self.pages) > self.maxsize:
            self.pages.popitem(last=False)
            self.evictions += 1
        return page
