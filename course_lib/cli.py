"""The ``course`` command: ``doctor``, ``build``, ``lab`` and ``services start|stop|status``.

Errors a user can fix (an unreachable URL, nothing to run) end the command with one line on
stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import services
from .services.resolve import mask

__all__ = ["main"]


_INSTALLED_FROM = Path(__file__).resolve().parent.parent


def _checkout() -> Path | None:
    """The course checkout the current folder is in, if any."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "course_lib").is_dir():
            return folder
    return None


def _root() -> Path:
    """The course folder: the checkout we are in, else the one the package was installed from."""
    return _checkout() or _INSTALLED_FROM


def _doctor(_: argparse.Namespace) -> int:
    from .doctor import package_versions, services_frame

    frame = services_frame()
    print(frame.drop(columns=["error"]).to_string())
    print()
    for name, version in package_versions().items():
        print(f"{name:<12} {version}")
    broken = frame[~frame["ok"]]
    errors = dict.fromkeys(broken["error"])  # one line per distinct problem
    for error in errors:
        services_hit = ", ".join(broken.index[broken["error"] == error])
        print(f"course: error: {services_hit}: {error}", file=sys.stderr)
    return 1 if len(broken) else 0


def _build(args: argparse.Namespace) -> int:
    from .build import build

    checkout = _checkout()
    root = checkout or _INSTALLED_FROM
    report = services.status()
    for item in report:
        if not item.ok:
            raise services.ServiceError(f"{item.service}: {item.error}")
    # Outside a checkout, results go where the user is, never into the installed package.
    out = Path(args.out) if args.out else (checkout or Path.cwd()) / "build"
    runs = build(
        root,
        [Path(p) for p in args.notebooks] or None,
        out=out,
        inplace=args.inplace,
        timeout=args.timeout,
        services_used=[f"{item.service} {item.version} ({item.source})" for item in report],
    )
    for run in runs:
        print(run.describe())
    if not args.inplace:
        print(f"open {out.resolve() / 'index.html'}")
    return 0 if all(run.ok for run in runs) else 1


def _lab(args: argparse.Namespace) -> int:
    os.environ["REDIS_URL"] = services.redis_url()
    os.environ["DATABASE_URL"] = services.database_url()
    print(f"REDIS_URL={mask(services.redis_url())}")
    print(f"DATABASE_URL={mask(services.database_url())}")
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--notebook-dir={_root() / 'notebooks'}",
        "--ServerApp.ip=127.0.0.1",
        *args.jupyter_args,
    ]
    os.execv(sys.executable, command)
    return 0  # pragma: no cover - execv does not return


def _services(args: argparse.Namespace) -> int:
    if args.action == "start":
        for name, url in services.start_embedded().items():
            print(f"{name}: running at {mask(url)}")
    elif args.action == "stop":
        for name, was_running in services.stop_embedded().items():
            print(f"{name}: {'stopped' if was_running else 'was not running'}")
    else:
        for name, server in (
            ("redis", services.EmbeddedRedis.default()),
            ("postgres", services.EmbeddedPostgres.default()),
        ):
            state = "running" if server.is_running() else "stopped"
            print(f"{name}: embedded server {state} in {server.root}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course", description="perf-course: run, build and check the course."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "doctor", help="show which Redis/PostgreSQL the course uses; exit 1 if one is unreachable"
    ).set_defaults(func=_doctor)
    build = sub.add_parser("build", help="execute the notebooks and write HTML under build/")
    build.add_argument("notebooks", nargs="*", help="notebooks to run (default: all, in order)")
    build.add_argument("--out", help="output folder (default: build/)")
    build.add_argument(
        "--inplace", action="store_true", help="write outputs back into the notebooks"
    )
    build.add_argument(
        "--timeout", type=_positive_int, default=600, help="seconds allowed per cell"
    )
    build.set_defaults(func=_build)
    lab = sub.add_parser(
        "lab", help="provision the services and start JupyterLab (other options go to it)"
    )
    lab.set_defaults(func=_lab)
    svc = sub.add_parser("services", help="start, stop or inspect the embedded servers")
    svc.add_argument("action", choices=("start", "stop", "status"))
    svc.set_defaults(func=_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Everything after `course lab` that is not ours goes to JupyterLab unchanged.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.jupyter_args = extra
    try:
        return args.func(args)
    except BrokenPipeError:  # `course doctor | head`: the reader left, nothing to report
        return 0
    except (services.ServiceError, ValueError, OSError) as exc:
        print(f"course: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
