"""Reading prepared Parquet on a running Ray: Ray 2.60's default reader (V2, a pool of footer-reader
actors per read) against the task-based one (V1) that ``ray_app.prepared.read_parquet`` picks.

Run: ``python benchmarks/parquet_read_startup.py [--files 8] [--rows 2000] [--repeats 5]``
(``make bench-parquet-read``). One local Ray instance (2 CPUs, as this machine); the two readers
alternate, each read is a fresh ``read_split`` of one split (as every training epoch, evaluate and
Tune trial does). Reports the median time to the first batch and to the last row, and the worker
processes Ray started for the reads (one log file each in the session folder), with ratios.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray


def write_prepared(folder: str, files: int, rows: int) -> str:
    """A prepared-data layout (``status=ok`` Parquet parts with a ``split`` column)."""
    ok = os.path.join(folder, "prepared", "status=ok")
    os.makedirs(ok)
    rng = np.random.default_rng(0)
    for part in range(files):
        split = rng.choice(["train", "val", "test"], size=rows, p=[0.8, 0.1, 0.1])
        pq.write_table(
            pa.table({"x": rng.random(rows), "label": rng.integers(0, 10, rows), "split": split}), os.path.join(ok, f"{part}.parquet")
        )
    return os.path.join(folder, "prepared")


def worker_processes() -> int:
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    return len(glob.glob(os.path.join(session, "logs", "python-core-worker-*.log")))


def one_read(prepared: str, v2: bool) -> dict[str, float]:
    from ray_app.prepared import PARQUET_READER_ENV, read_split

    # Ray's own switch, which read_split leaves alone when it is set.
    os.environ[PARQUET_READER_ENV] = "1" if v2 else "0"
    ray.data.DataContext.get_current().use_datasource_v2 = v2
    before = worker_processes()
    started = time.perf_counter()
    first = None
    rows = 0
    for batch in read_split(prepared, "train", ["x", "label"]).iter_batches(batch_size=256):
        first = first if first is not None else time.perf_counter() - started
        rows += len(batch["x"])
    total = time.perf_counter() - started
    time.sleep(1)  # processes started for this read have written their log file by now
    return {"first_batch_s": first, "total_s": total, "rows": rows, "workers_started": worker_processes() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000, help="rows per file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        prepared = write_prepared(folder, args.files, args.rows)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            runs: dict[str, list[dict[str, float]]] = {"V2 (Ray's default)": [], "V1 (ray_app)": []}
            for _ in range(args.repeats):  # alternating: both sides see the same machine
                runs["V2 (Ray's default)"].append(one_read(prepared, v2=True))
                runs["V1 (ray_app)"].append(one_read(prepared, v2=False))
        finally:
            ray.shutdown()
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print(f"{args.files} files x {args.rows} rows, {args.repeats} alternating reads of the train split each (medians)")
    print(f"{'reader':<20}{'first batch s':>15}{'whole read s':>14}{'workers/read':>14}{'rows':>8}")
    for name, m in medians.items():
        print(f"{name:<20}{m['first_batch_s']:>15.2f}{m['total_s']:>14.2f}{m['workers_started']:>14.1f}{m['rows']:>8.0f}")
    old, new = medians["V2 (Ray's default)"], medians["V1 (ray_app)"]
    assert old["rows"] == new["rows"], "the two readers returned different rows"
    print(f"ratio V2/V1: first batch {old['first_batch_s'] / new['first_batch_s']:.1f}x, whole read {old['total_s'] / new['total_s']:.1f}x")


if __name__ == "__main__":
    main()
