"""The ``course`` command: ``doctor``, ``build``, ``lab``, ``slides --set`` and
``services start|stop|status``.

Errors a user can fix (an unreachable URL, nothing to run) end the command with one line on
stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import services
from .services.resolve import mask

__all__ = ["LAB_SETTINGS", "ROOT_NOTE", "lab_command", "lab_settings_file", "main"]


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
        jobs=args.jobs,
        services_used=[f"{item.service} {item.version} ({item.source})" for item in report],
    )
    for run in runs:
        print(run.describe())
    if not args.inplace:
        if (out / "landing.png").is_file():
            print(f"screenshot of the landing page: {out.resolve() / 'landing.png'}")
        print(f"open {out.resolve() / 'index.html'}")
    return 0 if all(run.ok for run in runs) else 1


# JupyterLab settings for the course, installed into this environment's own settings folder
# ({sys.prefix}/share/jupyter/lab/settings/overrides.d/, read by JupyterLab 4 after its
# defaults and before the user's own settings): no news prompt and no update check (nothing
# to ask a student, no request leaves the machine), Markdown opens rendered (the start page),
# and the live slideshow (RISE) starts at the top and scrolls a tall slide.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension:plugin": {
        "defaultViewers": {"markdown": "Markdown Preview"},
    },
    "jupyterlab-rise:plugin": {
        "start_slideshow_at": "beginning",
        "scroll": True,
        # RISE's default theme ("simple") imports web fonts, "white" capitalises headings
        # (identifiers like `ip_hash` in them too); "serif" does neither
        "theme": "serif",
    },
}
START_PAGE = "START_HERE.md"


def _replace(target: Path, text: str) -> None:
    """Write ``target`` whole or not at all: a JupyterLab already running (another
    ``course lab``) never reads it half written."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)


def lab_settings_file() -> Path:
    """Where ``course lab`` installs :data:`LAB_SETTINGS` in the current environment."""
    return Path(sys.prefix) / "share/jupyter/lab/settings/overrides.d/perf-course.json"


def _install_lab_settings() -> None:
    target = lab_settings_file()
    text = json.dumps(LAB_SETTINGS, indent=2) + "\n"
    try:
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            _replace(target, text)
    except OSError as exc:  # a read-only environment: JupyterLab still starts, with its prompt
        print(f"course: note: could not install the course's JupyterLab settings: {exc}")


def _write_start_page(root: Path) -> str:
    """Write the start page next to the notebooks; return its path relative to them."""
    from .build import start_page

    checkout = _checkout()
    ledger = (checkout or Path.cwd()) / "build" / "runs.json"
    _replace(root / "notebooks" / START_PAGE, start_page(root, ledger))
    return START_PAGE


ROOT_NOTE = (
    "course: running as root (usual in containers), so JupyterLab gets --allow-root; "
    "it refuses root without it"
)


def lab_command(
    notebooks: Path, jupyter_args: list[str], *, as_root: bool, start: str | None
) -> tuple[list[str], list[str]]:
    """The command ``course lab`` runs and the lines it prints first: JupyterLab on
    ``notebooks``, on loopback, opening ``start`` (a file under ``notebooks``) if given;
    ``--allow-root`` added only ``as_root`` (JupyterLab refuses root otherwise, and stays as
    strict as it is for everyone else); ``jupyter_args`` last, so the user's win."""
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--notebook-dir={notebooks}",
        "--ServerApp.ip=127.0.0.1",
    ]
    notes = []
    if start is not None:
        command.append(f"--LabApp.default_url=/lab/tree/{start}")
    if as_root and "--allow-root" not in jupyter_args:
        notes.append(ROOT_NOTE)
        command.append("--allow-root")
    return [*command, *jupyter_args], notes


def _lab(args: argparse.Namespace) -> int:
    os.environ["REDIS_URL"] = services.redis_url()
    os.environ["DATABASE_URL"] = services.database_url()
    print(f"REDIS_URL={mask(services.redis_url())}")
    print(f"DATABASE_URL={mask(services.database_url())}")
    root = _root()
    _install_lab_settings()
    try:
        start: str | None = _write_start_page(root)
    except OSError as exc:  # no start page where notebooks/ is read-only: JupyterLab as is
        print(f"course: note: no start page ({exc})")
        start = None
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    command, notes = lab_command(
        root / "notebooks", args.jupyter_args, as_root=as_root, start=start
    )
    for note in notes:
        print(note)
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # pragma: no cover - execv does not return


def _slides(args: argparse.Namespace) -> int:
    from .build import discover, set_default_slides

    paths = [Path(p) for p in args.notebooks] or [
        p for p in discover(_root()) if p.parent.name != "solutions"
    ]
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            raise ValueError(f"not a notebook file: {path}")
    for path in paths:
        filled = set_default_slides(path)
        print(f"{path}: {filled} cell(s) got a slide type" if filled else f"{path}: unchanged")
    return 0


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
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
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
    build.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="notebooks run side by side, the longest first (default: 2; 1 runs them in order)",
    )
    build.set_defaults(func=_build)
    lab = sub.add_parser(
        "lab", help="provision the services and start JupyterLab (other options go to it)"
    )
    lab.set_defaults(func=_lab)
    slides = sub.add_parser(
        "slides",
        help="write the default slide types into the notebooks, for the live slideshow (RISE)",
    )
    slides.add_argument("notebooks", nargs="*", help="notebooks (default: the course's)")
    slides.add_argument(
        "--set",
        action="store_true",
        required=True,
        help="set a slide type on every cell that has none (sources and outputs untouched)",
    )
    slides.set_defaults(func=_slides)
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
