"""nbval, plus one check: every chart cell can be run again after the whole notebook ran.

Students re-run cells all the time. After nbval has executed a notebook's cells in order, the
cells whose committed output holds a chart (an ``image/png``) are executed once more in the
same kernel, in order; each such re-run is a test item of its own ("Cell N (re-run)") that
fails if the cell raises (its output is not compared: a timing chart differs run to run).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from nbval.plugin import IPyNbCell, IPyNbFile


def _draws_a_chart(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reruns: dict[IPyNbFile, list[IPyNbCell]] = defaultdict(list)
    last_index: dict[IPyNbFile, int] = {}
    for index, item in enumerate(items):
        if isinstance(item, IPyNbCell) and isinstance(item.parent, IPyNbFile):
            last_index[item.parent] = index
            if _draws_a_chart(item.cell):
                options = defaultdict(bool, item.options)
                options["check"] = False
                reruns[item.parent].append(
                    IPyNbCell.from_parent(
                        item.parent,
                        name=f"{item.name} (re-run)",
                        cell_num=item.cell_num,
                        cell=item.cell,
                        options=options,
                    )
                )
    # Insert from the last notebook backwards so earlier positions stay valid.
    for parent, index in sorted(last_index.items(), key=lambda pair: -pair[1]):
        items[index + 1 : index + 1] = reruns.get(parent, [])
