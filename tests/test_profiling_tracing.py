"""course_lib.profiling tracing: spans from traced functions, SQLAlchemy and redis over real
servers, the once-per-process provider, the waterfall; and the lesson's blog over HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis as redis_lib
from matplotlib.figure import Figure
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from sqlalchemy import Engine, text

from course_lib import services
from course_lib.http import serve
from course_lib.measure import QueryCounter
from course_lib.profiling import apm, span_table, traced, tracing, waterfall
from course_lib.profiling.lesson.as_written import processar_task
from course_lib.profiling.lesson.service import PAGE, Blog, make_app, seed_blog


@traced("inner")
def inner(x: int) -> int:
    return x * 2


@traced()
def outer() -> int:
    return inner(1) + inner(2)


@traced("fails")
def fails() -> None:
    raise RuntimeError("planted")


def by_name(spans: list, name: str) -> list:
    return [s for s in spans if s.name == name]


@pytest.mark.one_pass
def test_traced_spans_have_correct_parent_child_links() -> None:
    with tracing() as spans:
        assert outer() == 6
    (root,) = by_name(spans, "outer")
    children = by_name(spans, "inner")
    assert len(spans) == 3 and len(children) == 2
    assert root.parent is None
    for child in children:
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
    assert root.attributes["code.function"] == "outer"


@pytest.mark.one_pass
def test_traced_records_an_exception_and_reraises_it() -> None:
    with tracing() as spans, pytest.raises(RuntimeError, match="planted"):
        fails()
    (span,) = spans
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


@pytest.mark.one_pass
def test_traced_async_function_and_the_modules_processar_task() -> None:
    @traced("async_work")
    async def work() -> int:
        await asyncio.sleep(0)
        return processar_task([1, 2, 3])

    with tracing() as spans:
        assert asyncio.run(work()) == 14
    (parent,) = by_name(spans, "async_work")
    (child,) = by_name(spans, "processar_task")
    assert child.parent.span_id == parent.context.span_id


@pytest.mark.one_pass
def test_traced_rejects_a_bare_function_and_a_bad_name() -> None:
    with pytest.raises(TypeError, match=r"@traced\(\)"):
        traced(outer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        traced("")


def test_sqlalchemy_and_redis_spans_carry_statement_and_command(
    pg_engine: Engine, redis: redis_lib.Redis, ns: str
) -> None:
    with tracing(engines=[pg_engine]) as spans, pg_engine.connect() as conn:
        assert conn.execute(text("SELECT 40 + :x"), {"x": 2}).scalar() == 42
        redis.set(f"{ns}:k", "v")
        assert redis.get(f"{ns}:k") == b"v"
    table = span_table(spans)
    db = table[(table["system"] == "postgresql") & (table["statement"] != "")]
    # the instrumentation must produce database spans on the installed SQLAlchemy (2.1):
    # without skip_dep_check it silently instruments nothing
    assert len(db) >= 1, table
    assert any("SELECT 40 +" in s for s in db["statement"]), table
    commands = table[table["system"] == "redis"]
    assert list(commands["name"]) == ["SET", "GET"], table
    assert all(s.split()[0] in ("SET", "GET") for s in commands["statement"])


def test_instrumentation_is_removed_on_exit_and_the_list_stops_filling(
    pg_engine: Engine, redis: redis_lib.Redis, ns: str
) -> None:
    with tracing(engines=[pg_engine]) as spans:
        redis.get(f"{ns}:a")
    seen = len(spans)
    with pg_engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    redis.get(f"{ns}:b")
    assert len(spans) == seen == 1
    with tracing() as again:  # redis only: a new block instruments again
        redis.get(f"{ns}:c")
        with pg_engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # this engine is no longer instrumented
    assert [s.name for s in again] == ["GET"]


def test_provider_is_installed_once_and_blocks_nest(redis: redis_lib.Redis, ns: str) -> None:
    with tracing():
        provider = trace.get_tracer_provider()
        exporter = apm._exporter
    with tracing() as outer_spans:
        with tracing() as inner_spans:
            redis.get(f"{ns}:x")
        redis.get(f"{ns}:y")  # still instrumented: the outer block is open
    assert trace.get_tracer_provider() is provider
    assert apm._exporter is exporter
    assert [s.name for s in inner_spans] == ["GET"]
    assert [s.name for s in outer_spans] == ["GET", "GET"]


def test_nested_block_cannot_add_an_engine(pg_engine: Engine) -> None:
    with tracing(), pytest.raises(ValueError, match="engines"), tracing(engines=[pg_engine]):
        pass
    with pytest.raises(TypeError, match="engines"), tracing(engines=["not an engine"]):  # type: ignore[list-item]
        pass


def test_spans_finished_in_other_threads_land_in_the_list(redis: redis_lib.Redis) -> None:
    with tracing() as spans:
        workers = [threading.Thread(target=outer) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert len(by_name(spans, "outer")) == 4 and len(by_name(spans, "inner")) == 8


@pytest.mark.one_pass
def test_waterfall_renders_one_bar_per_span() -> None:
    with tracing() as spans:
        outer()
    fig = waterfall(spans, title="one request")
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    assert len(bars) == 3
    table = span_table(spans)
    assert list(table["depth"]) == [0, 1, 1]
    assert (table["start_ms"] >= 0).all() and (table["duration_ms"] >= 0).all()
    with pytest.raises(ValueError, match="empty"):
        waterfall([])


@pytest.fixture
def blog(redis: redis_lib.Redis, ns: str):
    schema = services.unique_schema("tprof")
    engine = services.schema_engine(schema)
    try:
        seed_blog(engine)
        yield Blog(engine, redis, ns, traced=True)
    finally:
        engine.dispose()
        services.drop_schema(schema)


def test_slow_and_fast_listing_return_the_same_json_with_52_vs_1_queries(blog: Blog) -> None:
    blog.fast_listing()  # fills the counts cache
    with QueryCounter(blog.engine) as slow:
        slow_body = blog.slow_listing()
    with QueryCounter(blog.engine) as fast:
        fast_body = blog.fast_listing()
    assert slow_body == fast_body
    assert slow.count == 1 + 1 + PAGE  # counts, page, one author per post
    assert fast.count == 1


def test_one_http_request_traces_handler_stages_redis_and_the_n_plus_1_ladder(
    blog: Blog,
) -> None:
    with (
        tracing(engines=[blog.engine]) as spans,
        serve(make_app(blog)) as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        assert client.get("/posts/fast").status_code == 200  # warms the counts cache
        spans.clear()
        assert client.get("/posts/slow", headers={"X-User": "alice"}).status_code == 200
        slow = span_table(list(spans))
        spans.clear()
        assert client.get("/posts/fast", headers={"X-User": "alice"}).status_code == 200
        fast = span_table(list(spans))
    assert slow["name"].iloc[0] == "GET /posts/slow" and slow["depth"].iloc[0] == 0
    queries = slow[slow["statement"] != ""]
    ladder = queries[queries["system"] == "postgresql"]
    assert len(ladder) == 1 + 1 + PAGE
    assert (ladder["statement"].str.contains("authors")).sum() == PAGE
    stages = slow[slow["depth"] == 1]["name"].tolist()
    assert stages == [
        "check_limit",
        "category_counts_uncached",
        "load_page_n_plus_1",
        "render_naive",
    ]
    assert "EVALSHA" in set(slow["name"])  # the limiter's one round trip
    fast_queries = fast[(fast["system"] == "postgresql") & (fast["statement"] != "")]
    assert len(fast_queries) == 1
    assert list(fast[fast["system"] == "redis"]["name"]) == ["EVALSHA", "GET"]


@traced("rows")
def rows(n: int, fail_at: int | None = None):
    for i in range(n):
        time.sleep(0.02)  # the body's own time: the span must cover it
        if i == fail_at:
            raise ValueError("planted in the generator")
        yield inner(i)  # a traced call in the body: a child of "rows"
    return "done"


@traced("consumer_step")
def consumer_step() -> None:
    pass


@pytest.mark.one_pass
def test_traced_generator_spans_the_iteration_and_parents_only_its_body() -> None:
    with tracing() as spans:
        got = []
        for item in rows(3):
            got.append(item)
            consumer_step()  # runs between two items: not a child of "rows"
    assert got == [0, 2, 4]
    (span,) = by_name(spans, "rows")
    assert (span.end_time - span.start_time) / 1e9 >= 0.06  # before: 0.06 ms, not 60 ms
    assert span.status.status_code is StatusCode.UNSET and not span.events
    children = by_name(spans, "inner")
    assert len(children) == 3
    assert all(child.parent.span_id == span.context.span_id for child in children)
    assert all(step.parent is None for step in by_name(spans, "consumer_step"))
    assert all(span.start_time <= c.start_time <= c.end_time <= span.end_time for c in children)


@pytest.mark.one_pass
def test_traced_generator_records_an_exception_and_keeps_send_and_return() -> None:
    with tracing() as spans, pytest.raises(ValueError, match="planted in the generator"):
        list(rows(3, fail_at=1))
    (span,) = by_name(spans, "rows")
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes["exception.type"] == "ValueError"

    @traced("echo")
    def echo():
        received = yield "ready"
        while received is not None:
            try:
                received = yield received * 2
            except KeyError:
                received = yield "caught"
        return "finished"

    def delegate():
        return (yield from echo())

    with tracing() as spans:
        steps = delegate()
        assert next(steps) == "ready"
        assert steps.send(4) == 8
        assert steps.throw(KeyError("k")) == "caught"
        with pytest.raises(StopIteration) as stop:
            steps.send(None)
    assert stop.value.value == "finished"
    (span,) = by_name(spans, "echo")
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.one_pass
def test_traced_generator_closed_early_ends_its_span_and_runs_its_finally() -> None:
    cleaned = []

    @traced("endless")
    def endless():
        try:
            while True:
                yield inner(1)
        finally:
            cleaned.append(trace.get_current_span().get_span_context().span_id)

    with tracing() as spans:
        for _ in zip(range(2), endless(), strict=False):
            pass
        # two traced generators iterated in lockstep keep their own children
        pairs = list(zip(rows(2), endless(), strict=False))
    assert pairs == [(0, 2), (2, 2)]
    first, second = by_name(spans, "endless")
    assert first.status.status_code is StatusCode.UNSET and first.end_time is not None
    assert cleaned == [first.context.span_id, second.context.span_id]  # its finally, in its span
    (row_span,) = by_name(spans, "rows")
    parents = [c.parent.span_id for c in by_name(spans, "inner")]
    assert parents.count(row_span.context.span_id) == 2
    assert parents.count(first.context.span_id) == 2  # zip asked it for 2 items
    assert parents.count(second.context.span_id) == 2


@pytest.mark.one_pass
def test_traced_async_generator_spans_the_iteration() -> None:
    @traced("ticks")
    async def ticks(n: int, fail: bool = False):
        for i in range(n):
            await asyncio.sleep(0.02)
            yield await twice(i)
        if fail:
            raise RuntimeError("planted in the async generator")

    @traced("twice")
    async def twice(x: int) -> int:
        return 2 * x

    async def consume(fail: bool) -> list[int]:
        got = []
        async for item in ticks(3, fail):
            got.append(item)
            consumer_step()
        return got

    async def close_early() -> None:
        steps = ticks(10)
        assert await steps.__anext__() == 0
        await steps.aclose()

    with tracing() as spans:
        assert asyncio.run(consume(False)) == [0, 2, 4]
        with pytest.raises(RuntimeError, match="planted in the async generator"):
            asyncio.run(consume(True))
        asyncio.run(close_early())
    ok, failed, closed = by_name(spans, "ticks")
    assert (ok.end_time - ok.start_time) / 1e9 >= 0.06
    assert ok.status.status_code is StatusCode.UNSET and not ok.events
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert closed.status.status_code is StatusCode.UNSET and closed.end_time is not None
    parents = [c.parent.span_id for c in by_name(spans, "twice")]
    assert parents == [ok.context.span_id] * 3 + [failed.context.span_id] * 3 + [
        closed.context.span_id
    ]
    assert all(step.parent is None for step in by_name(spans, "consumer_step"))


def test_blocks_overlapping_across_threads_instrument_until_the_last_one_exits(
    redis: redis_lib.Redis, ns: str
) -> None:
    entered, first_left, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[str]] = {}

    def second_block() -> None:
        with tracing() as spans:
            entered.set()
            first_left.wait(30)
            redis.get(f"{ns}:after-the-first-left")  # still instrumented: this block is open
        seen["second"] = [s.name for s in spans]
        done.set()

    with tracing() as first:
        worker = threading.Thread(target=second_block)
        worker.start()
        assert entered.wait(30)
        redis.get(f"{ns}:both-open")
    first_left.set()
    assert done.wait(30)
    worker.join(30)
    redis.get(f"{ns}:none-open")
    assert [s.name for s in first] == ["GET"]
    assert seen["second"] == ["GET", "GET"]


OWN_SETUP = """
import json, sys
import redis
from opentelemetry import trace
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from course_lib.profiling import tracing

own = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(own))
trace.set_tracer_provider(provider)
RedisInstrumentor().instrument()  # the application instruments redis itself
client = redis.Redis.from_url(sys.argv[1])
with tracing() as spans:
    client.get(sys.argv[2] + ":in")
client.get(sys.argv[2] + ":out")  # its own instrumentation is still there
print(json.dumps({
    "same_provider": trace.get_tracer_provider() is provider,
    "block": [s.name for s in spans],
    "own": [s.name for s in own.get_finished_spans()],
}))
"""


def test_the_applications_provider_and_instrumentation_are_kept(ns: str) -> None:
    url = services.redis_url()
    done = subprocess.run(
        [sys.executable, "-c", OWN_SETUP, url, ns], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # one span per GET (not repeated), the block's exporter added to the app's provider
    assert json.loads(done.stdout) == {
        "same_provider": True,
        "block": ["GET"],
        "own": ["GET", "GET"],
    }
