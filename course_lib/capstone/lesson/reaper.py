"""The capstone Redis's reaper: stops that server if the program that started it dies.

The Redis of :func:`.rig.stack` daemonizes (it is the course's embedded server, in a private
folder), so a kernel killed outright (``kill -9``, an out-of-memory kill) would leave it
running. :func:`start_reaper` starts this module as a small process that waits for that
program to die and then kills the server and removes its folder; :func:`.rig.stack` stops
the reaper when it stops the server itself. (The PostgreSQL servers have their own reaper,
see :class:`course_lib.db.ReplicaSet`; the app processes stop themselves.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["start_reaper"]


def start_reaper(
    pidfile: Path, root: Path, *, parent: int | None = None
) -> subprocess.Popen[bytes]:
    """Start the reaper for the Redis whose pid is in ``pidfile`` and whose folder is
    ``root``, watching process ``parent`` (default: this one)."""
    watched = os.getpid() if parent is None else parent
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(watched), str(pidfile), str(root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the kernel's group does not reach it
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(parent: int, pidfile: Path, root: Path) -> None:
    while _alive(parent):
        time.sleep(0.5)
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    _reap(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
