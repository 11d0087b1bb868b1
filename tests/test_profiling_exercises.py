"""Each checker of notebook 05 passes the reference solution and fails planted wrong answers."""

from __future__ import annotations

from collections import OrderedDict

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from course_lib.exercises.profiling import check_bounded_cache, check_n_plus_1_fix
from course_lib.profiling.lesson.service import PAGE, Post


def reference_page(engine):
    query = select(Post).options(joinedload(Post.author)).order_by(Post.id.desc()).limit(PAGE)
    with Session(engine) as session:
        return [
            {"id": p.id, "title": p.title, "author": p.author.name} for p in session.scalars(query)
        ]


def n_plus_1_page(engine):
    query = select(Post).order_by(Post.id.desc()).limit(PAGE)
    with Session(engine) as session:
        return [
            {"id": p.id, "title": p.title, "author": p.author.name} for p in session.scalars(query)
        ]


def oldest_page(engine):
    query = select(Post).options(joinedload(Post.author)).order_by(Post.id).limit(PAGE)
    with Session(engine) as session:
        return [
            {"id": p.id, "title": p.title, "author": p.author.name} for p in session.scalars(query)
        ]


def not_attempted_page(engine):
    raise NotImplementedError


def test_n_plus_1_checker_passes_the_reference() -> None:
    assert check_n_plus_1_fix(reference_page)


def test_n_plus_1_checker_fails_an_n_plus_1() -> None:
    result = check_n_plus_1_fix(n_plus_1_page)
    assert not result and "51 SQL statements" in result.message


def test_n_plus_1_checker_fails_the_wrong_rows() -> None:
    result = check_n_plus_1_fix(oldest_page)
    assert not result and "wrong page" in result.message


def test_n_plus_1_checker_reports_not_attempted() -> None:
    result = check_n_plus_1_fix(not_attempted_page)
    assert not result and "not attempted" in result.message


class LRU:
    def __init__(self, maxsize):
        self.maxsize, self.pages = maxsize, OrderedDict()

    def get(self, key, build):
        if key in self.pages:
            self.pages.move_to_end(key)
            return self.pages[key]
        value = self.pages[key] = build(key)
        if len(self.pages) > self.maxsize:
            self.pages.popitem(last=False)
        return value


class Unbounded:
    def __init__(self, maxsize):
        self.pages = {}

    def get(self, key, build):
        if key not in self.pages:
            self.pages[key] = build(key)
        return self.pages[key]


class FIFO(LRU):
    """Bounded, but evicts the oldest insertion even if it was just used."""

    def get(self, key, build):
        if key in self.pages:
            return self.pages[key]
        value = self.pages[key] = build(key)
        if len(self.pages) > self.maxsize:
            self.pages.popitem(last=False)
        return value


class NoCache:
    def __init__(self, maxsize):
        pass

    def get(self, key, build):
        return build(key)


def not_attempted_cache(maxsize):
    raise NotImplementedError


def test_bounded_cache_checker_passes_the_reference() -> None:
    assert check_bounded_cache(LRU)


def test_bounded_cache_checker_fails_an_unbounded_cache() -> None:
    result = check_bounded_cache(Unbounded)
    assert not result and "not bounded" in result.message


def test_bounded_cache_checker_fails_fifo_eviction() -> None:
    result = check_bounded_cache(FIFO)
    assert not result and "least recently used" in result.message


def test_bounded_cache_checker_fails_a_cache_that_rebuilds() -> None:
    result = check_bounded_cache(NoCache)
    assert not result and "a hit rebuilt" in result.message


def test_bounded_cache_checker_reports_not_attempted() -> None:
    result = check_bounded_cache(not_attempted_cache)
    assert not result and "not attempted" in result.message
