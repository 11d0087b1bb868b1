"""narrate (sentences from the run), progress (bars that leave no frames), charts.claim."""

from __future__ import annotations

import jinja2
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from course_lib.build import fill_instructor_page
from course_lib.charts import Claim, claim
from course_lib.narrate import Figure, figures_of, say

pytestmark = pytest.mark.one_pass


def _run(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    return nb


def test_say_in_a_kernel_shows_markdown_and_records_what_it_showed() -> None:
    nb = _run(
        "from course_lib.narrate import say, record\n"
        "import numpy as np\n"
        "say('p99 is {p99:.1f} ms over {n:,} calls', p99=np.float64(12.345), n=12000)\n"
        "record('.2f', ratio=1.23456)",
        # narrating costs a kernel no nbformat (and its jsonschema: seconds of imports)
        "import sys\nassert 'nbformat' not in sys.modules",
    )
    shown = [o for o in nb.cells[0].outputs if "text/markdown" in o.get("data", {})]
    assert [o.data["text/markdown"] for o in shown] == ["p99 is 12.3 ms over 12,000 calls"]
    figures = figures_of(nb)
    assert figures["p99"] == Figure(12.345, "12.3")
    assert figures["n"] == Figure(12000, "12,000")
    assert str(figures["ratio"]) == "1.23"


def test_say_refuses_a_sentence_and_figures_that_do_not_match(capsys) -> None:
    with pytest.raises(ValueError, match="no figure given for b"):
        say("{a} and {b}", a=1)
    with pytest.raises(ValueError, match="not quoted by the template: c"):
        say("{a}", a=1, c=2)
    with pytest.raises(ValueError, match="two format specs"):
        say("{a:.1f} vs {a:.2f}", a=1.0)
    with pytest.raises(TypeError, match="template"):
        say(3)  # type: ignore[arg-type]
    say("{a:.1f} ms", a=2.25)
    assert capsys.readouterr().out == "2.2 ms\n"


def test_figures_of_refuses_one_name_with_two_texts() -> None:
    nb = _run(
        "from course_lib.narrate import say\nsay('{x}', x=1)",
        "say('{x}', x=2)",
    )
    with pytest.raises(ValueError, match="figure 'x' recorded twice"):
        figures_of(nb)


def test_instructor_page_is_filled_from_figures_and_refuses_unknown_names() -> None:
    figures = {"p99": Figure(12.345, "12.3")}
    page = "p99 {{ p99 }} ms (raw {{ p99.value }})\n"
    assert fill_instructor_page(page, figures) == "p99 12.3 ms (raw 12.345)\n"
    with pytest.raises(jinja2.UndefinedError, match="p50"):
        fill_instructor_page("{{ p50 }}", figures)


def test_progress_bar_in_a_kernel_leaves_no_frames_in_the_saved_output() -> None:
    nb = _run(
        "from course_lib.progress import progress\n"
        "for _ in progress(range(200), desc='work', mininterval=0):\n"
        "    pass\n"
        "print('done')"
    )
    texts = []
    for output in nb.cells[0].outputs:
        texts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    assert "".join(texts).strip() == "done"
    assert not any(o.get("name") == "stderr" for o in nb.cells[0].outputs)


def test_progress_outside_a_kernel_is_a_plain_bar_and_refuses_a_file() -> None:
    from course_lib.progress import progress

    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert list(progress(range(3), disable=True)) == [0, 1, 2]
    with pytest.raises(TypeError, match="file="):
        progress(range(3), file=None)


def test_claim_asserts_the_title_on_its_data() -> None:
    title = claim("B is faster", holds=np.float64(2.0) > 1.0)
    assert isinstance(title, Claim) and title == "B is faster"
    with pytest.raises(AssertionError, match="B is faster"):
        claim("B is faster", holds=False)
    with pytest.raises(TypeError, match="holds must be a bool"):
        claim("B is faster", holds=1.5)


def test_a_disabled_progress_bar_closes_cleanly() -> None:
    # tqdm sets no file on a disabled bar: closing one (as run_load(progress=False) does)
    # raised AttributeError before the fix.
    from course_lib.progress import progress

    bar = progress(total=3, disable=True)
    bar.update()
    bar.close()
