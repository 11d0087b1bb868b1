"""Freezing a real server process in a test: SIGSTOP for a block, SIGCONT always.

A stopped PostgreSQL keeps its connections open and answers nothing, the way a hung server
(a full disk, a stalled VM) looks to its clients. A module of its own, not conftest.py: two
conftest.py files exist (tests/ and notebooks/), and ``import conftest`` could reach either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psutil


def running(pid: int) -> bool:
    """Whether ``pid`` runs: a process that exited may linger as a zombie until its parent
    reaps it, and that does not count."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def suspended(pid: int) -> Iterator[list[psutil.Process]]:
    """SIGSTOP process ``pid`` and all its children (a postmaster: the whole server; a
    backend: that one session) for the block; SIGCONT each afterwards, also when the block
    raises. Yields the processes stopped."""
    parent = psutil.Process(pid)
    frozen = [parent, *parent.children(recursive=True)]
    try:
        for process in frozen:
            process.suspend()
        yield frozen
    finally:
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()
