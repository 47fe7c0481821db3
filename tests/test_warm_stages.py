"""How the Ray Data stages size and pick their workers (pure decisions and the per-process cache;
no Ray started here)."""

from __future__ import annotations

import pytest

from ray_app.engine import warm


@pytest.mark.parametrize(
    ("max_workers", "rows", "rows_per_call", "expected"),
    [
        (2, 600, 1024, 1),  # one block: a second actor would start for nothing
        (2, 1024, 1024, 1),
        (2, 1025, 1024, 2),
        (2, 5000, 256, 2),  # more calls than workers: the configured maximum
        (4, 3 * 256, 256, 3),
        (2, 0, 256, 1),  # never an empty pool
        (2, None, 256, 2),  # size unknown: the configured maximum
    ],
)
def test_pool_is_sized_to_the_input(max_workers, rows, rows_per_call, expected):
    assert warm.pool_size(max_workers, rows, rows_per_call) == expected


class Counter:
    built = 0

    def __init__(self, start: int) -> None:
        Counter.built += 1
        self.total = start

    def __call__(self, batch: list[int]) -> int:
        self.total += sum(batch)
        return self.total


def test_a_warm_worker_builds_the_step_once_per_run_and_never_reuses_another_runs():
    Counter.built = 0
    assert warm.call_warm([1, 2], Counter, {"start": 10}, "run-a") == 13
    assert warm.call_warm([3], Counter, {"start": 10}, "run-a") == 16  # same object: built once
    assert Counter.built == 1
    # Same constructor arguments, another run: a fresh object (a constructor may read files).
    assert warm.call_warm([3], Counter, {"start": 10}, "run-b") == 13
    assert Counter.built == 2
    warm.call_warm([0], Counter, {"start": 0}, "run-c")
    assert len(warm._instances) <= warm._KEEP  # finished runs' objects do not pile up in the worker


def test_table_rows_are_read_by_a_plain_function_with_file_row_ids(tmp_path):
    """Predict's table reader is a function (Ray Data runs it as tasks in started workers; a
    callable class would get a pool of new actor processes): a CSV file per call, a Parquet row
    group per call, each row keyed '<file>#<row in file>'."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_app.workloads.base import ROW_ID_COLUMN, read_table_chunks

    csv = tmp_path / "a.csv"
    csv.write_text("text,label\ngood,1\nbad,0\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "label": [1, 0, 1]}), parquet, row_group_size=2)
    assert not isinstance(read_table_chunks, type)
    batch = {
        "uri": np.array([str(csv), str(parquet)], dtype=object),
        "format": np.array(["csv", "parquet"], dtype=object),
        "row_group": np.array([0, 1]),
        "first_row": np.array([0, 2]),
    }
    rows = read_table_chunks(batch).to_pydict()
    assert rows["text"] == ["good", "bad", "z"]  # the Parquet file's second row group only
    assert rows[ROW_ID_COLUMN] == [f"{csv}#0", f"{csv}#1", f"{parquet}#2"]
