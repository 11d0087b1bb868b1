"""``course_lib.lua``: one loader for every script, EVALSHA with a reload on NOSCRIPT, one
round trip per call and per pipeline, sync and asyncio clients."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import redis.asyncio

from course_lib import lua, services
from course_lib.measure import RoundTripCounter

PACKAGES = ("course_lib.caching", "course_lib.rate_limiting")
ECHO = lua.Script("echo", "return {KEYS[1], ARGV[1]}")


@pytest.fixture(scope="module")
def private_url() -> Iterator[str]:
    """A Redis of this module's own: its tests flush the script cache, which on the shared
    server would add NOSCRIPT round trips to whatever test counts round trips meanwhile."""
    with tempfile.TemporaryDirectory(prefix="pc-lua-", dir="/tmp") as folder:
        server = services.EmbeddedRedis(Path(folder) / "redis")
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.mark.one_pass
def test_every_lua_file_of_the_package_loads() -> None:
    names = [
        (package, entry.name[:-4])
        for package in PACKAGES
        for entry in resources.files(package).iterdir()
        if entry.name.endswith(".lua")
    ]
    assert len(names) >= 12
    for package, name in names:
        script = lua.load(package, name)
        assert "redis.call" in script.source or name in ("_now", "_batch"), name
        assert lua.load(package, name) is script  # read once


@pytest.mark.one_pass
def test_unknown_script_and_empty_source_are_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        lua.load("course_lib.caching", "nope")
    with pytest.raises(ValueError, match="source"):
        lua.Script("empty", "  ")


@pytest.mark.one_pass
def test_prelude_comes_first_and_epilogue_last() -> None:
    script = lua.load("course_lib.rate_limiting", "gcra", prelude="_now", epilogue="_batch")
    now = lua.load("course_lib.rate_limiting", "_now").source
    gcra = lua.load("course_lib.rate_limiting", "gcra").source
    loop = lua.load("course_lib.rate_limiting", "_batch").source
    assert script.source == now + gcra + loop


def test_call_reloads_after_script_flush_in_one_extra_round_trip(ns, private_url) -> None:
    counter = RoundTripCounter(private_url)
    client = counter.client
    client.script_flush()
    counter.reset()
    assert ECHO(client, [f"{ns}:k"], ["v"]) == [f"{ns}:k".encode(), b"v"]
    assert counter.count == 3  # EVALSHA -> NOSCRIPT, SCRIPT LOAD, EVALSHA
    counter.reset()
    ECHO.bind(client)(keys=[f"{ns}:k"], args=["v"])
    assert counter.count == 1
    client.close()


def test_pipeline_is_one_round_trip_and_returns_errors_in_place(ns, private_url) -> None:
    counter = RoundTripCounter(private_url)
    client = counter.client
    ECHO(client, ["warm"], ["up"])
    fail = lua.Script(
        "fail", "if ARGV[1] == 'bad' then return redis.error_reply('no') end return 1"
    )
    fail(client, [], ["ok"])
    counter.reset()
    replies = fail.pipeline(client, [([], ["ok"]), ([], ["bad"]), ([], ["ok"])])
    assert counter.count == 1
    assert replies[0] == 1 and replies[2] == 1
    assert isinstance(replies[1], redis.ResponseError)
    client.script_flush()
    counter.reset()
    assert fail.pipeline(client, [([], ["ok"])] * 5) == [1] * 5
    assert counter.count == 3  # pipeline -> NOSCRIPT, SCRIPT LOAD, pipeline again
    client.close()


def test_asyncio_client_call_and_pipeline(ns, private_url) -> None:
    async def scenario() -> tuple[object, list[object]]:
        client = redis.asyncio.Redis.from_url(private_url)
        try:
            await client.script_flush()
            one = await ECHO.acall(client, [f"{ns}:a"], ["1"])
            await client.script_flush()
            many = await ECHO.apipeline(client, [([f"{ns}:b"], ["2"]), ([f"{ns}:c"], ["3"])])
            return one, many
        finally:
            await client.aclose()

    one, many = asyncio.run(scenario())
    assert one == [f"{ns}:a".encode(), b"1"]
    assert many == [[f"{ns}:b".encode(), b"2"], [f"{ns}:c".encode(), b"3"]]


def test_a_client_of_the_wrong_kind_is_refused_not_handed_a_coroutine() -> None:
    sync = redis.Redis.from_url(services.redis_url())
    aio = redis.asyncio.Redis.from_url(services.redis_url())
    try:
        for call in (
            lambda: ECHO(aio, ["k"], ["v"]),
            lambda: ECHO.pipeline(aio, [(["k"], ["v"])]),
            lambda: ECHO.bind(aio),
            lambda: ECHO.abind(sync),
        ):
            with pytest.raises(TypeError, match="Redis client"):
                call()
        with pytest.raises(TypeError, match="acall/apipeline/abind"):
            ECHO(aio)
        with pytest.raises(TypeError, match="__call__/pipeline/bind"):
            asyncio.run(ECHO.acall(sync))
    finally:
        sync.close()
        asyncio.run(aio.aclose())
