"""The races of the notebook: shown on the seed's steps, fixed in course_lib, also with threads."""

from __future__ import annotations

import threading

import pytest

from course_lib.caching import CacheAside, WriteThrough
from course_lib.caching.lesson import races
from course_lib.caching.lesson.users import UserStore, seed_users


@pytest.fixture
def store(pg_engine):
    seed_users(pg_engine, 50, seed=3)
    return UserStore(pg_engine)


def _non_enterprise(store):
    return next(k for k in range(1, 51) if store.load(k)["plan"] != "enterprise")


def test_write_through_race_seed_is_stale_course_lib_is_not(redis, ns, pg_engine, store):
    seed_race = races.write_through_race_seed(redis, pg_engine, 7, prefix=f"{ns}:user")
    assert seed_race.stale
    assert seed_race.database["plan"] == "team" and seed_race.cache == {"plan": "pro"}
    wt = WriteThrough(redis, store, ttl=60, namespace=ns)
    fixed = races.write_through_race_course_lib(wt, 8)
    assert not fixed.stale
    assert fixed.cache == fixed.database
    assert [s[2] for s in fixed.steps][2:] == ["True", "False"]
    assert wt.stats["stale_sets_rejected"] == 1


def test_invalidation_race_seed_is_stale_course_lib_is_not(redis, ns, pg_engine, store):
    uid = _non_enterprise(store)
    seed_race = races.invalidation_race_seed(redis, pg_engine, uid, prefix=f"{ns}:user")
    assert seed_race.stale
    seed_users(pg_engine, 50, seed=3)
    cache = CacheAside(redis, store.load, ttl=60, namespace=ns)
    fixed = races.invalidation_race_course_lib(cache, store, uid)
    assert not fixed.stale
    assert fixed.cache["plan"] == "enterprise"
    assert cache.stats["stale_fills_rejected"] == 1


@pytest.mark.timeout(30)
def test_invalidation_race_with_real_threads(redis, ns, store):
    """A reader thread paused inside its loader; the writer updates and invalidates meanwhile."""
    uid = _non_enterprise(store)
    loaded, resume = threading.Event(), threading.Event()

    def paused_loader(key):
        row = store.load(key)
        loaded.set()
        resume.wait(10)
        return row

    cache = CacheAside(redis, paused_loader, ttl=60, namespace=ns)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("v", cache.get(uid)))
    reader.start()
    assert loaded.wait(10)
    store.save(uid, {"plan": "enterprise"})
    cache.invalidate(uid)
    resume.set()
    reader.join(10)
    assert result["v"]["plan"] != "enterprise"  # the reader itself saw the old row...
    assert redis.get(cache.key(uid)) is None  # ...but did not cache it
    assert cache.get(uid)["plan"] == "enterprise"


@pytest.mark.timeout(30)
def test_write_through_race_with_real_threads(redis, ns, store):
    """Writer 1 commits first but reaches Redis last; the cache keeps writer 2's newer row."""
    committed, resume = threading.Event(), threading.Event()

    class PausingStore(UserStore):
        def save(self, key, value):
            row = super().save(key, value)
            if value.get("plan") == "pro":
                committed.set()
                resume.wait(10)
            return row

    wt = WriteThrough(redis, PausingStore(store.engine), ttl=60, namespace=ns)
    first = threading.Thread(target=lambda: wt.write(5, {"plan": "pro"}))
    first.start()
    assert committed.wait(10)
    wt.write(5, {"plan": "team"})
    resume.set()
    first.join(10)
    assert wt.read(5)["plan"] == "team" == store.load(5)["plan"]
