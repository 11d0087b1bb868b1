"""The Lua scripts of ``course_lib.caching`` (``<name>.lua`` beside this module), read once.

Each client registers a script once (``register_script``), which runs it with ``EVALSHA``
and sends the source only if the server does not know it yet, as the ``limits`` library
does. Works for ``redis.Redis`` and ``redis.asyncio.Redis`` alike.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

__all__ = ["NAMES", "register", "source"]

NAMES = ("release", "fill", "invalidate", "set_if_newer", "write_behind", "settle")


@cache
def source(name: str) -> str:
    """Text of ``<name>.lua``."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


def register(client: Any, *names: str) -> dict[str, Any]:
    """``{name: Script}`` for ``client``; call the script as ``script(keys=..., args=...)``."""
    return {name: client.register_script(source(name)) for name in names}
