"""CTR benchmark: the synthetic Criteo chain (model AUC against the true model's AUC and the
per-item baseline), then serving latency: p50/p99 at concurrency 1, 16 and 64, the model's own
in-process latency for one event, and the time from idle at zero replicas to the first answer.

Serving is measured once per variant in the same run, each in a fresh Ray instance (every Ray
process must inherit the variables at start):

* ``default``: Serve's defaults (Python proxy actor -> gateway -> model replica);
* ``throughput_optimized``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (gRPC between deployments,
  request logs buffered, user code on the replica's event loop);
* ``haproxy``: the same plus ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (C) takes the HTTP port and
  forwards straight to the gateway replicas' own HTTP servers, so no Python proxy hop.

Each variant runs once per model runtime (``--runtimes``): ``torch`` (the safetensors bundle) and
``onnx`` (the export register made; the replica imports neither torch nor transformers). The
replica footprint (import, load and first answer in a fresh process; peak RSS) is measured per
runtime too (benchmarks/replica_footprint.py).

Workers start with ray_app.worker_start's GC hook, as ``ray-app`` starts Ray; ``--worker-hook off on``
measures each run without it and then with it (runs named ``.../no-hook`` are the ones without).
Likewise ``--spares off on``: the node keeps a spare worker with Serve imported for the replica
(ray_app.warm_workers, as ``ray-app <workload> serve`` starts Ray); ``.../no-spare`` runs have none.

Run: ``python benchmarks/ctr_serving.py [--rows 500000] [--seconds 10] [--variants haproxy] [--runtimes torch onnx]
[--worker-hook off on] [--spares off on]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import ray
import requests
from ray import serve

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop, have_wrk, wrk_closed_loop  # noqa: E402
from replica_footprint import measure as footprint  # noqa: E402

from ray_app.bundle import load_bundle  # noqa: E402
from ray_app.config import load_config  # noqa: E402
from ray_app.demos.clicks import CRITEO_OPTIONS, generate_block, generate_criteo  # noqa: E402
from ray_app.engine.evaluate import run_evaluate  # noqa: E402
from ray_app.engine.prepare import run_prepare  # noqa: E402
from ray_app.engine.register import run_register  # noqa: E402
from ray_app.engine.train import run_train  # noqa: E402
from ray_app.registry import resolve_model_uri  # noqa: E402
from ray_app.runtime import SERVE_FAST_PATH_ENV, unused_loopback_port  # noqa: E402
from ray_app.serving.app import run_serve  # noqa: E402
from ray_app.warm_workers import serving_env  # noqa: E402
from ray_app.worker_start import hook_env  # noqa: E402


def wait_for_zero(timeout: float = 120) -> None:
    """No replica in any state: a replica still stopping holds its CPU, and a cold start that waits
    for it would measure the overlap, not the start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        deployment = serve.status().applications["ctr"].deployments["ctr-model"]
        if not sum(deployment.replica_states.values()):
            break
        time.sleep(0.25)
    time.sleep(1)  # the stopped worker process releases its resources


def measure_serving(config, bodies: list[bytes], args: argparse.Namespace) -> dict:
    """Cold starts from zero replicas, then closed-loop latency at concurrency 1, 16 and 64."""
    url = run_serve(config)["endpoint"]
    cold = []
    for _ in range(args.cold_starts):
        wait_for_zero()
        t = time.perf_counter()
        answer = requests.post(url, data=bodies[0], headers={"Content-Type": "application/json"}, timeout=120)
        cold.append(time.perf_counter() - t)
        assert answer.status_code == 200, answer.text
    if args.load_generator == "wrk":
        latency = [wrk_closed_loop(url, bodies[:64], "application/json", c, args.seconds) for c in (1, 16, 64)]
    else:
        latency = [closed_loop(url, lambda i: (bodies[i % len(bodies)], "application/json"), c, args.seconds) for c in (1, 16, 64)]
    return {"cold_start_s": cold, "latency": latency}


VARIANTS = {
    "default": {},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": SERVE_FAST_PATH_ENV,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--cold-starts", type=int, default=5)
    parser.add_argument("--runtimes", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"])
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk when installed (a C client leaves the CPU to the server)",
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--spares",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="a spare worker with Serve imported waits for the replica (ray_app.warm_workers; on: as `ray-app serve` starts Ray); 'off on' measures both",
    )
    parser.add_argument(
        "--worker-hook",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="workers start with ray_app.worker_start's GC hook (on: as `ray-app` starts Ray); 'off on' measures both",
    )
    args = parser.parse_args()
    if args.load_generator == "auto":
        args.load_generator = "wrk" if have_wrk() else "python"
    work = tempfile.mkdtemp(prefix="ray_app_ctr_bench_")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {}

    started = time.perf_counter()
    generate_criteo(os.path.join(work, "synthetic"), args.rows, seed=0)
    results["generate_rows_per_s"] = args.rows / (time.perf_counter() - started)

    port = unused_loopback_port()
    config = load_config(
        "ctr",
        overrides={
            "workspace": os.path.join(work, "ws"),
            "prepare.input": os.path.join(work, "synthetic"),
            "train.run_name": "bench",
            "train.epochs": 1,
            "train.batch_size": 1024,
            "serve.port": port,
            "serve.min_replicas": 0,
            "serve.max_replicas": 2,
            "serve.downscale_delay_s": 1,
            "serve.target_ongoing_requests": 2,
            **{f"options.{k}": v for k, v in CRITEO_OPTIONS.items()},
        },
    )
    for stage in (run_prepare, run_train):
        t = time.perf_counter()
        out = stage(config)
        results[f"{stage.__name__}_s"] = time.perf_counter() - t
        if stage is run_prepare:
            results["prepare_rows_per_s"] = out["rows_in"] / results["run_prepare_s"]
    evaluated = run_evaluate(config)
    results["auc"], results["baseline_auc"], results["true_auc"] = (
        evaluated["auc"],
        evaluated["baseline"]["auc"],
        evaluated["true_model"]["auc"],
    )
    run_register(config)

    # The model's own latency for one event: transform + forward, in process.
    bundle = load_bundle(resolve_model_uri(config.models_uri(), "ctr", "production"))
    events = generate_block({"id": np.arange(10_000, 10_500)}, seed=9).drop(columns=["click", "true_probability"]).to_dict("records")
    bodies = [json.dumps(e).encode() for e in events]
    timings = []
    for body in bodies[:300]:
        t = time.perf_counter()
        decoded = bundle.workload.decode_request(body, bundle.options, bundle.manifest)
        bundle.predict_proba(bundle.workload.stack_items([decoded[0][0]], bundle.options, bundle.manifest))
        timings.append(time.perf_counter() - t)
    results["inprocess_p50_ms"] = float(np.median(timings) * 1000)
    from ray_app.onnx_runtime import load_onnx_model

    onnx_model = load_onnx_model(resolve_model_uri(config.models_uri(), "ctr", "production"))
    timings = []
    for body in bodies[:300]:
        t = time.perf_counter()
        decoded = onnx_model.workload.decode_request(body, onnx_model.options, onnx_model.manifest)
        onnx_model.predict_proba(onnx_model.stack([decoded[0][0]]))
        timings.append(time.perf_counter() - t)
    results["inprocess_onnx_p50_ms"] = float(np.median(timings) * 1000)
    payload_file = os.path.join(work, "one_event.json")
    with open(payload_file, "wb") as f:
        f.write(bodies[0])
    results["footprint"] = {runtime: footprint(config.models_uri(), "ctr", runtime, payload_file) for runtime in args.runtimes}
    print(
        "MEASURED in-process and footprint: "
        + json.dumps({k: results[k] for k in ("inprocess_p50_ms", "inprocess_onnx_p50_ms", "footprint")}),
        flush=True,
    )

    ray.shutdown()
    results["serving"] = {}
    # With both hook settings, each variant/runtime runs with one and then the other, so the pairs
    # are measured minutes apart, not a whole benchmark apart.
    hooks = {"on": "", "off": "/no-hook"}
    spares = {"on": "", "off": "/no-spare"}
    runs = [
        f"{variant}/{runtime}{hooks[h]}{spares[w]}"
        for variant in args.variants
        for runtime in args.runtimes
        for h in args.worker_hook
        for w in args.spares
    ]
    for run in runs:
        variant, runtime = run.split("/")[:2]
        env = {**VARIANTS[variant], **({} if "/no-hook" in run else hook_env()), **({} if "/no-spare" in run else serving_env())}
        os.environ.update(env)
        config.serve.runtime = runtime
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        results["serving"][run] = measure_serving(config, bodies, args)
        measured = results["serving"][run]  # printed now too: a run cut short still reports what it measured
        print(f"MEASURED {run}: " + json.dumps(measured), flush=True)
        serve.shutdown()
        ray.shutdown()
        for key in env:
            del os.environ[key]

    print(f"\nsynthetic Criteo, {args.rows} rows: generated at {results['generate_rows_per_s']:.0f} rows/s (Ray Data)")
    print(
        f"  prepare {results['run_prepare_s']:.1f}s ({results['prepare_rows_per_s']:.0f} rows/s), train 1 epoch {results['run_train_s']:.1f}s"
    )
    print(f"  AUC model {results['auc']:.4f}  |  true model {results['true_auc']:.4f}  |  per-item baseline {results['baseline_auc']:.4f}")
    print(f"  model reaches {results['auc'] / results['true_auc']:.3f} of the true model's AUC")
    results["load_generator"] = args.load_generator
    print(
        f"\nserving ({args.load_generator} client): model in-process p50 {results['inprocess_p50_ms']:.2f} ms per event (torch), "
        f"{results['inprocess_onnx_p50_ms']:.2f} ms (ONNX Runtime)"
    )
    for runtime, f in results["footprint"].items():
        print(
            f"  replica footprint [{runtime}]: import {f['import_s']:.2f}s  load {f['load_s']:.2f}s  first answer {f['first_answer_s']:.3f}s  "
            f"total {f['total_s']:.2f}s  RSS {f['rss_mb']:.0f} MB (peak {f['peak_rss_mb']:.0f})  torch imported {f['torch_imported']}"
        )
    for variant, measured in results["serving"].items():
        cold = measured["cold_start_s"]
        print(f"  [{variant}] cold start from zero replicas: median {np.median(cold):.2f}s of " + ", ".join(f"{c:.2f}s" for c in cold))
        for row in measured["latency"]:
            print(
                f"  [{variant}] c={row['concurrency']:3d}: {row['req_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                f"p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}"
            )
    first = runs[0]
    for variant in runs:
        measured = results["serving"][variant]["latency"]
        if variant != first:
            for a, b in zip(results["serving"][first]["latency"], measured, strict=True):
                print(f"  c={a['concurrency']:3d}: {variant} / {first} = {b['req_per_s'] / a['req_per_s']:.2f}x req/s")
        inprocess = results["inprocess_onnx_p50_ms" if variant.split("/")[1] == "onnx" else "inprocess_p50_ms"]
        print(f"  [{variant}] c=1 p50 over the in-process latency of its runtime: {measured[0]['p50_ms'] - inprocess:.1f} ms")
        cold = np.median(results["serving"][variant]["cold_start_s"]) / np.median(results["serving"][first]["cold_start_s"])
        print(f"  [{variant}] cold start median / {first}: {cold:.2f}x")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/ctr_serving.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
