"""Run a command while every core is saturated by CPU hogs: ``python tests/busy.py CMD...``.

What a busy CI machine looks like to the suite (``make test-busy``): tests that order their
steps with sleeps "usually long enough" fail here; tests that wait for events or states pass.
``--hogs N`` (default: one per core, ``os.cpu_count()``) busy-looping processes run for
exactly the duration of the command and are always stopped: on its exit, on Ctrl-C or
``SIGTERM``, and, should this runner be killed outright, by themselves (each hog checks
that its parent is still this runner). Exits with the command's exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

# Spins, and leaves as soon as its parent (this runner) is gone.
HOG = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(200_000):
        pass
"""


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.hogs < 1:
        parser.error(f"--hogs must be >= 1, got {args.hogs}")
    if not args.command:
        parser.error("give the command to run")
    signal.signal(signal.SIGTERM, _terminated)
    hogs: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    status = 1
    try:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
        print(f"busy: {len(hogs)} CPU hogs running; {' '.join(args.command)}", flush=True)
        status = subprocess.call(args.command)
    except KeyboardInterrupt:
        status = 130
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
        load = os.getloadavg()[0]
        elapsed = time.monotonic() - start
        print(f"busy: {elapsed:.0f} s with {len(hogs)} hogs (load {load:.1f}); exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
