"""Behaviour features on the click endpoint (issue 18): what the Redis lookup costs.

One run, one Ray instance, Serve on its fast path (``ray_app.runtime.SERVE_FAST_PATH_ENV``) unless
``--default-path``; a throwaway ``redis-server`` on a free loopback port, filled with MovieLens-100K:

* ingest: events/s into Redis, in-process (pipelined batches of the Lua update) and through
  ``POST /ctr/events`` at concurrency 1 (batches of 100 events per request);
* the lookup's own latency: ``OnlineStore.read`` for one event, in-process (p50/p99);
* c=1 end to end (wrk, C, one connection, when installed; else Python): ``POST /ctr/predict`` with the lookup (behaviour model) and without it (the same
  architecture without behaviour inputs), each its own app in the same Serve instance.

Models are the real architectures with seeded weights (``untrained_model``): latency does not depend
on what the weights learned. Run: ``python benchmarks/ctr_features.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import ray
import requests
from ray import serve

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop, have_wrk, wrk_closed_loop  # noqa: E402

from ray_app.demos.clicks import MOVIELENS_OPTIONS, movielens_clicks  # noqa: E402
from ray_app.features.behaviour import BehaviourSpec  # noqa: E402
from ray_app.features.online_store import LocalRedis, OnlineStore  # noqa: E402
from ray_app.runtime import SERVE_FAST_PATH_ENV, unused_loopback_port  # noqa: E402
from ray_app.serving.app import compose_app  # noqa: E402
from ray_app.serving.loaders import InMemoryLoader, untrained_model  # noqa: E402
from ray_app.workloads.ctr import CLASSES, CTRTransform  # noqa: E402

SPEC = BehaviourSpec("user_id", "item_id", "timestamp", "click", "event_id", "genre")
OPTIONS = {**MOVIELENS_OPTIONS, "behaviour_user_column": "user_id", "behaviour_category_column": "genre"}


def manifest(behaviour: bool) -> dict:
    numeric = list(MOVIELENS_OPTIONS["numeric_columns"]) + (SPEC.numeric_columns() if behaviour else [])
    categorical = MOVIELENS_OPTIONS["categorical_columns"]
    ones = [1.0] * len(numeric)
    transform = CTRTransform(numeric, categorical, 1 << 14, [0.0] * len(numeric), ones, *((SPEC.last_n, [1, 2]) if behaviour else (0, [])))
    return {
        "classes": CLASSES,
        "transform": asdict(transform),
        "behaviour": asdict(SPEC) if behaviour else None,
        "time_cutoffs": None,
        "split_fractions": [0.1, 0.1],
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--default-path", action="store_true", help="Serve's default Python proxy instead of the fast path")
    parser.add_argument(
        "--python-client", action="store_true", help="c=1 from Python threads + requests, not wrk (its own CPU shows in the tail)"
    )
    args = parser.parse_args()
    if not args.default_path:
        os.environ.update(SERVE_FAST_PATH_ENV)  # before Ray starts: every Ray process inherits it
    frame = movielens_clicks()
    events = frame[SPEC.event_fields() + ["age", "release_year"]].to_dict("records")
    client = "python" if args.python_client or not have_wrk() else "wrk"
    results: dict = {"serve_path": "default" if args.default_path else "fast", "client": client, "events": len(events)}
    with LocalRedis() as url:
        store = OnlineStore(url, SPEC, timeout_s=2.0)
        started = time.perf_counter()
        for i in range(0, len(events), 500):
            store.ingest(events[i : i + 500])
        results["ingest_in_process_events_per_s"] = round(len(events) / (time.perf_counter() - started))
        store.mark_seeded({"source": "benchmark"})  # the whole log is in: reads are not degraded
        rng = np.random.default_rng(0)
        dated = [e for e in events if np.isfinite(e["release_year"])]  # a request needs every field
        asks = [dated[i] for i in rng.integers(0, len(dated), 2000)]
        lookups = []
        for event in asks:
            t0 = time.perf_counter()
            store.read([event["user_id"]], [event["item_id"]], [event["timestamp"] + 1])
            lookups.append(time.perf_counter() - t0)
        results["lookup_in_process"] = percentiles(lookups)

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = unused_loopback_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scaling = {"min_replicas": 1, "max_replicas": 1, "alias_poll_s": 0, "num_cpus": 0.5}
        base = f"http://127.0.0.1:{port}"
        for name, behaviour in (("with_lookup", True), ("without_lookup", False)):
            model = untrained_model("ctr", manifest(behaviour), OPTIONS if behaviour else MOVIELENS_OPTIONS, version=1)
            ctr = {**scaling, "feature_store": url if behaviour else None}
            args_ = {"workloads": {"ctr": ctr}, "gateway": {"allow_unauthenticated": True}}
            serve.run(compose_app(args_, loaders={"ctr": InMemoryLoader({"production": model})}), name=name, route_prefix=f"/{name}")

        def body(k: int) -> tuple[bytes, str]:
            event = asks[k % len(asks)]
            ask = {c: event[c] for c in ("user_id", "item_id", "genre", "age", "release_year")}
            return json.dumps({**ask, "timestamp": event["timestamp"] + 1}).encode(), "application/json"

        for name in ("with_lookup", "without_lookup"):
            url_ = f"{base}/{name}/ctr/predict"
            for _ in range(50):  # warm: connections, first batches
                requests.post(url_, data=body(0)[0], headers={"Content-Type": "application/json"}, timeout=30).raise_for_status()
            if have_wrk() and not args.python_client:
                bodies = [body(k)[0] for k in range(500)]
                results[f"c1_{name}"] = wrk_closed_loop(url_, bodies, "application/json", concurrency=1, seconds=args.seconds)
            else:
                results[f"c1_{name}"] = closed_loop(url_, body, concurrency=1, seconds=args.seconds)
            print(json.dumps({f"c1_{name}": results[f"c1_{name}"]}), flush=True)  # kept if a later step fails
        answer = requests.post(f"{base}/with_lookup/ctr/predict", data=body(1)[0], timeout=30).json()
        results["with_lookup_degraded"] = answer["degraded"]

        store.client.flushdb()
        # Only the history's fields: a few films have no release year (NaN is not JSON).
        history = [{k: e[k] for k in SPEC.event_fields()} for e in events]
        batches = [{"events": history[i : i + 100]} for i in range(0, len(history), 100)]
        ingest_url = f"{base}/with_lookup/ctr/events"
        started, sent = time.perf_counter(), 0
        session = requests.Session()
        for batch in batches:
            if time.perf_counter() - started > args.seconds:
                break
            session.post(ingest_url, json=batch, timeout=30).raise_for_status()
            sent += len(batch["events"])
        results["ingest_http_c1_events_per_s"] = round(sent / (time.perf_counter() - started))
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
