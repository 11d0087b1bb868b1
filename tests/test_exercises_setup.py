"""The warm-up checker passes the reference answers and fails planted wrong ones."""

from __future__ import annotations

import pytest
from sqlalchemy import NullPool, create_engine

from course_lib.exercises.setup import check_get_many, check_pool


def reference(client, keys):
    return client.mget(keys)


def test_reference_passes(capsys) -> None:
    result = check_get_many(reference)
    assert result.passed
    assert capsys.readouterr().out.startswith("PASS check_get_many: 50 keys (10 missing)")


def test_one_round_trip_per_key_fails() -> None:
    result = check_get_many(lambda client, keys: [client.get(k) for k in keys])
    assert not result and "50 round trips; expected 1" in result.message


def test_wrong_order_fails() -> None:
    result = check_get_many(lambda client, keys: client.mget(sorted(keys)))
    assert not result and "order matters" in result.message


def test_not_attempted_is_reported() -> None:
    def stub(client, keys):
        raise NotImplementedError

    result = check_get_many(stub)
    assert not result and result.message.startswith("not attempted yet")


def test_a_crashing_answer_is_a_fail_line_not_an_exception() -> None:
    result = check_get_many(lambda client, keys: client.execute_command("NOSUCHCOMMAND"))
    assert not result and result.message.startswith("get_many raised ResponseError")


def test_too_few_keys_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="keys"):
        check_get_many(reference, keys=1)


def sized_pool(url):
    return create_engine(url, pool_size=4, max_overflow=0)


def test_pool_reference_passes(capsys) -> None:
    assert check_pool(sized_pool)
    assert capsys.readouterr().out.startswith("PASS check_pool: 8 threads x 25 queries")


def test_a_new_connection_per_query_fails() -> None:
    result = check_pool(lambda url: create_engine(url, poolclass=NullPool))
    assert not result and "opened 200 connections" in result.message


def test_a_pool_that_gives_up_waiting_fails() -> None:
    # a pool of 4 whose threads may not wait at all: some of 8 threads find it empty
    result = check_pool(lambda url: create_engine(url, pool_size=4, max_overflow=0, pool_timeout=0))
    assert not result and "must wait for a free connection" in result.message


def test_pool_not_attempted_and_not_an_engine() -> None:
    def stub(url):
        raise NotImplementedError

    assert check_pool(stub).message.startswith("not attempted yet")
    assert "not an Engine" in check_pool(lambda url: url).message


def test_pool_bad_parameters_are_value_errors() -> None:
    with pytest.raises(ValueError, match="threads"):
        check_pool(sized_pool, threads=4, connections=4)
    with pytest.raises(ValueError, match="connections"):
        check_pool(sized_pool, connections=0)
    with pytest.raises(ValueError, match="queries"):
        check_pool(sized_pool, queries=0)
