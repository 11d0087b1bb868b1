"""Child processes that stop by themselves when the process that started them dies.

A notebook's kernel killed outright (``kill -9``, a kernel restart that does not wait, an
out-of-memory kill) runs no ``finally`` block, no context manager and no ``atexit`` hook, so
the servers and workers it started would run on, holding ports, Redis connections and queue
entries. Each long-lived child the course starts calls :func:`watch_parent` once: a daemon
thread notices that its parent is gone (the parent pid changes once the parent dies: the
child is re-parented to init or a subreaper) and runs the child's own way of stopping.
Linux's ``PR_SET_PDEATHSIG`` would do this without a thread, but only on Linux and only for
the thread that forked; polling works wherever the course runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from course_lib.validation import positive_number

__all__ = ["watch_parent"]


def watch_parent(
    on_orphaned: Callable[[], object], *, parent: int | None = None, interval: float = 0.5
) -> threading.Thread:
    """Start a daemon thread that calls ``on_orphaned()`` once, within about ``interval``
    seconds of this process's parent dying; return the thread.

    ``parent`` is the pid the parent had when it started this process (``os.getpid()`` in
    the parent, before forking): then a parent that died before this call is noticed too.
    Without it, the parent is this process's parent at the time of the call.
    ``on_orphaned`` runs in that thread, so it should signal the main thread
    (``signal.pthread_kill(main_thread_id, signal.SIGTERM)``, an ``Event.set()``) rather than
    tear things down itself; ``os.kill(os.getpid(), ...)`` may be taken by this thread and
    leave a main thread blocked in a system call uninterrupted. A child forked from this
    process later does not inherit the thread (``fork`` copies only the calling thread), so
    an RQ work-horse is not stopped by its worker's watch. Raises ``ValueError`` if
    ``interval`` is not a positive number.
    """
    interval = positive_number("interval", interval)
    expected = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(interval)
        on_orphaned()

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread
