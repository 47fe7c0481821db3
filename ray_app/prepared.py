"""The prepared-data layout, shared by the engine stages and the workloads: where good rows and
rejects live, the manifest, row counts and reading one split. Neutral ground: it imports neither
the engine nor a workload, so both can import it without a cycle.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as pads

from ray_app import storage

if TYPE_CHECKING:
    import numpy as np
    import ray.data

# Every preparer and batch predictor emits these two columns so one Parquet write, partitioned by
# status, splits good rows from rejects in a single streaming pass.
STATUS_OK = "ok"
STATUS_REJECTED = "rejected"

MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"


# Prepared data and predictions are published atomically (``storage.publishing``): every reader
# goes through ``storage.published`` to the current version, so a re-run that replaces the output
# meanwhile cannot mix files of two versions into one read.
def ok_uri(prepared_uri: str) -> str:
    return storage.join(storage.published(prepared_uri), f"status={STATUS_OK}")


def rejected_uri(prepared_uri: str) -> str:
    return storage.join(storage.published(prepared_uri), f"status={STATUS_REJECTED}")


def count_rows(uri: str, filter_expr: Any = None) -> int:
    """Row count from Parquet metadata (no data read unless a filter needs one column)."""
    if not storage.exists(uri):
        return 0
    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows(filter=filter_expr)


def load_manifest(prepared_uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(storage.published(prepared_uri), MANIFEST_FILE))


def load_summary(output_uri: str) -> dict[str, Any]:
    """The summary of a prepare or predict output (its current published version)."""
    return storage.read_json(storage.join(storage.published(output_uri), SUMMARY_FILE))


def data_fingerprint(prepared_uri: str) -> str:
    """SHA-256 over the prepared files' names and sizes plus the manifest: changes whenever the
    training data does, without reading the data. Train records it in every checkpoint (a resume
    on other data is refused) and register in the model's metadata."""
    current = storage.published(prepared_uri)  # resolved once: manifest and files of one version
    digest = hashlib.sha256(storage.read_bytes(storage.join(current, MANIFEST_FILE)))
    for info in sorted(storage.list_files(ok_uri(current)), key=lambda f: f.path):
        digest.update(f"{info.base_name}:{info.size}\n".encode())
    return digest.hexdigest()


# Ray's own switch between its two Parquet readers (``DataContext.use_datasource_v2``); when the
# user sets it, theirs wins.
PARQUET_READER_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def read_parquet(uri: str) -> ray.data.Dataset:
    """``ray.data.read_parquet`` with the task-based (V1) reader unless ``RAY_DATA_USE_DATASOURCE_V2``
    says otherwise. Ray 2.60's default (V2) lists every read through a new pool of 32 footer-reader
    actors: 32 Python processes to start for a handful of files on a 2-core machine, on every
    epoch's re-read too. V1 reads the footers in the driver (or in tasks on the workers already
    running, for many files). Measured here: first batch of a warm read 1.0-1.3 s -> 0.1-0.2 s,
    and 255 -> 168 worker processes started over the test suite (BENCHMARKS.md)."""
    import ray.data

    if PARQUET_READER_ENV not in os.environ:
        # Per process, read at each read_parquet call: set where the read is made (a driver, a
        # job, a Tune trial), as Ray reads it.
        ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(uri)


def split_columns(prepared_uri: str, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    """The good rows of one (small) split as one numpy array per column, read in this process.
    For splits a run holds in memory: a Ray Data read of a few MB cost ~0.5 s per split of
    planning and read tasks before its first row. The columns are converted as Ray Data converts
    a block to a numpy batch (the same Ray helper), so tensors and bytes arrive as they would."""
    import pyarrow.compute as pc
    from ray.data.block import BlockAccessor

    fs, path = storage.resolve(ok_uri(prepared_uri))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns, filter=pc.field("split") == split)
    return BlockAccessor.for_block(table).to_batch_format("numpy")


def read_split(prepared_uri: str, split: str, columns: list[str]) -> ray.data.Dataset:
    """The good rows of one split as a Ray Dataset (Parquet column projection, filter on split)."""
    from ray.data.expressions import col

    # select_columns right after the read: Ray's optimizer pushes the projection into the Parquet
    # read (``columns=`` on read_parquet is deprecated in Ray 2.60).
    rows = read_parquet(ok_uri(prepared_uri)).select_columns([*columns, "split"])
    return rows.filter(expr=col("split") == split).select_columns(columns)  # an expression, not a string: pushed down
