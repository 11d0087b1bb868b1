"""The lesson code of notebook 05: the leak and its bound, and py-spy recording the blog's
workload as its child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib import services
from course_lib.profiling.flame import read_collapsed, stack_share
from course_lib.profiling.lesson import leak, workload
from course_lib.profiling.lesson.service import seed_blog


@pytest.mark.one_pass
def test_unbounded_cache_keeps_every_page_and_the_bounded_one_keeps_the_recent_ones() -> None:
    unbounded, bounded = leak.UnboundedPageCache(), leak.BoundedPageCache(10)
    queries = leak.query_strings(100)
    assert len(set(queries)) == 100
    for query in queries:
        assert unbounded.get(query) == bounded.get(query) == leak.render_page(query)
    assert len(unbounded.pages) == 100
    assert list(bounded.pages) == queries[-10:] and bounded.evictions == 90
    bounded.get(queries[-10])  # a hit moves it to the most recently used end
    bounded.get("/new")
    assert queries[-10] in bounded.pages and queries[-9] not in bounded.pages
    with pytest.raises(ValueError, match="maxsize"):
        leak.BoundedPageCache(0)
    with pytest.raises(TypeError, match="maxsize"):
        leak.BoundedPageCache(True)


@pytest.fixture
def seeded_schema():
    schema = services.unique_schema("tprofw")
    engine = services.schema_engine(schema)
    try:
        seed_blog(engine)
        yield schema
    finally:
        engine.dispose()
        services.drop_schema(schema)


def test_workload_serves_the_requested_number_of_requests(
    seeded_schema: str, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert workload.main([seeded_schema, ns, "--variant", "fast", "--requests", "3"]) == 0
    assert capsys.readouterr().out.startswith("served 3 fast requests in ")


@pytest.mark.timeout(120)
def test_py_spy_records_the_workload_as_its_child(
    seeded_schema: str, ns: str, tmp_path: Path
) -> None:
    out = tmp_path / "stacks.txt"
    env = dict(os.environ, REDIS_URL=services.redis_url(), DATABASE_URL=services.database_url())
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    command = [py_spy, "record", "--rate", "200", "--format", "raw", "-o", str(out), "--"]
    child = [sys.executable, "-m", "course_lib.profiling.lesson.workload", seeded_schema, ns]
    done = subprocess.run(
        [*command, *child, "--requests", "15"],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )
    if done.returncode != 0 and "ermission" in done.stderr:
        pytest.skip(f"py-spy cannot read a child's memory here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    assert "served 15 slow requests" in done.stdout
    stacks = read_collapsed(out.read_text())
    shares = {
        stage: stack_share(stacks, f"Blog.{stage}", root="Blog.slow_listing")
        for stage in ("check_limit", "category_counts_uncached", "load_page_n_plus_1")
    }
    assert max(shares, key=shares.get) == "load_page_n_plus_1", shares
