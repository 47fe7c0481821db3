"""Text serving on ONNX Runtime against torch (issue 15 item 2), in one run:

* a real classifier: packaged MiniLM (pretrained weights) with its linear head fitted by logistic
  regression on mean-pooled embeddings of real Rotten Tomatoes snippets (a minute of CPU, where
  fine-tuning would take many);
* register-time export through ``ray_app.onnx_export.export_checked``: parity with torch, the int8
  copy judged on held-out texts (accuracy change, agreement with fp32);
* agreement of int8 with fp32 on ``--agreement-texts`` held-out texts (register's own int8 verdict);
* req/s and latency at concurrency 16 (and 1) for one replica each of torch fp32, ONNX fp32 and
  ONNX int8, through the same Serve app (wrk when installed);
* replica footprint: import + load + first answer time and peak RSS in a fresh process per runtime.

Run: ``python benchmarks/text_serving.py [--seconds 10] [--agreement-texts 2000]``. Prints ratios;
writes benchmarks/results/text_serving.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray
from ray import serve

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop, have_wrk, wrk_closed_loop  # noqa: E402
from replica_footprint import measure as footprint  # noqa: E402

from ray_app.config import load_config  # noqa: E402
from ray_app.demos.data import ROTTEN_TOMATOES, package_file  # noqa: E402
from ray_app.runtime import SERVE_FAST_PATH_ENV, unused_loopback_port  # noqa: E402
from ray_app.serving.app import run_serve  # noqa: E402

OPTIONS = {"max_length": 64}
MANIFEST = {"classes": ["fresh", "rotten"], "split_fractions": [0.1, 0.1], "max_length": 64, "model_dir": None}
BATCH = 64


def reviews(seed: int = 0) -> tuple[list[str], np.ndarray]:
    with pa.input_stream(package_file(*ROTTEN_TOMATOES), compression="bz2") as stream:
        table = pacsv.read_csv(stream)
    table = table.filter(pc.is_in(table["category"], pa.array(["fresh", "rotten"])))
    order = np.random.default_rng(seed).permutation(table.num_rows)
    texts = table["text"].take(order).to_pylist()
    labels = np.array([0 if c == "fresh" else 1 for c in table["category"].take(order).to_pylist()])
    return texts, labels


def arrays(bundle, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Texts as the model's numpy batches, through the workload's own decoding."""
    out = []
    for start in range(0, len(texts), BATCH):
        body = json.dumps({"texts": texts[start : start + BATCH]}).encode()
        items = [item for item, _ in bundle.workload.decode_request(body, bundle.options, bundle.manifest)]
        out.append(bundle.workload.stack_arrays(items, bundle.options, bundle.manifest))
    return out


def fitted_classifier(texts: list[str], labels: np.ndarray):
    """Pretrained MiniLM + a logistic-regression head on its mean-pooled embeddings."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from ray_app.bundle import ModelBundle
    from ray_app.workloads import get_workload

    workload = get_workload("text")
    options = workload.parse_options(OPTIONS)
    model = workload.build_model(options, MANIFEST, pretrained=True).eval()
    bundle = ModelBundle(workload, options, MANIFEST, model, {"workload": "text", "metrics": {}}, torch.device("cpu"))
    pooled: list[np.ndarray] = []
    hook = model.head.register_forward_hook(lambda module, args, output: pooled.append(args[0].detach().numpy()))
    for batch in arrays(bundle, texts):
        bundle.predict_proba({k: torch.from_numpy(v) for k, v in batch.items()})
    hook.remove()
    head = LogisticRegression(max_iter=1000).fit(np.concatenate(pooled), labels)
    with torch.no_grad():  # logits [0, w.x + b]: softmax gives sigmoid(w.x + b), the fitted model
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[1] = torch.from_numpy(head.coef_[0].astype(np.float32))
        model.head.bias[1] = float(head.intercept_[0])
    return bundle


def registered(work: str, bundle, held_out: list[dict[str, np.ndarray]], held_out_labels: np.ndarray) -> tuple[str, dict]:
    from ray_app.bundle import save_bundle
    from ray_app.onnx_export import export_checked
    from ray_app.registry import ModelRegistry

    folder = os.path.join(work, "bundle")
    save_bundle(
        bundle.model, folder, {"workload": "text", "options": bundle.options.model_dump(mode="json"), "manifest": MANIFEST, "metrics": {}}
    )
    exports = os.path.join(work, "exports")
    os.makedirs(exports)
    started = time.perf_counter()
    record, files = export_checked(bundle, held_out, held_out_labels, exports, 1e-4, 256, True, 0.01, split="held-out")
    record["export_s"] = time.perf_counter() - started
    models = os.path.join(work, "models")
    ModelRegistry(models).register("text", folder, {"run_name": "bench", "onnx": record}, alias="production", extra_files=files)
    return models, record


def agreement(record: dict) -> dict:
    """int8 against fp32 on the held-out texts, as register judged it (``onnx.int8``); ONNX fp32
    against torch is the parity check (max probability difference on 256 texts and a batch of one)."""
    i8 = record["int8"]
    return {
        "texts": i8["rows"],
        "int8_vs_fp32": i8["agreement_with_fp32"],
        "accuracy": {"onnx_fp32": i8["accuracy_fp32"], "onnx_int8": i8["accuracy_int8"]},
        "fp32_vs_torch_max_abs_diff": record["parity"]["max_abs_diff"],
    }


VARIANTS = {"torch_fp32": ("torch", "fp32"), "onnx_fp32": ("onnx", "fp32"), "onnx_int8": ("onnx", "int8")}


def serve_variants(args: argparse.Namespace, models: str, record: dict, port: int, bodies: list[bytes]) -> dict[str, list[dict]]:
    """Each variant deployed in turn (one replica) and loaded at each concurrency."""
    served: dict[str, list[dict]] = {}
    for name, (runtime, precision) in VARIANTS.items():
        if precision == "int8" and not record["int8"]["accepted"]:
            print(f"  [{name}] not served: register refused the int8 copy ({record['int8']['note']})")
            continue
        overrides = {
            "models": models,
            "serve.port": port,
            "serve.min_replicas": 1,
            "serve.max_replicas": 1,
            "serve.runtime": runtime,
            "serve.onnx_precision": precision,
            "serve.alias_poll_s": 0,
        }
        url = run_serve(load_config("text", overrides=overrides))["endpoint"]
        for body in bodies[:8]:  # warm: first batches, tokenizer load
            closed_loop(url, lambda i, body=body: (body, "application/json"), 1, 0.2)
        if args.load_generator == "wrk":
            rows = [wrk_closed_loop(url, bodies, "application/json", c, args.seconds) for c in args.concurrency]
        else:
            rows = [closed_loop(url, lambda i: (bodies[i % len(bodies)], "application/json"), c, args.seconds) for c in args.concurrency]
        served[name] = rows
        print(f"  [{name}] " + "  ".join(f"c={r['concurrency']}: {r['req_per_s']:.1f} req/s" for r in rows), flush=True)
    return served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--fit-texts", type=int, default=1000)
    parser.add_argument("--agreement-texts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--rounds", type=int, default=1, help="the variants one after another this many times; medians and per-round ratios are reported"
    )
    parser.add_argument("--load-generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--fast-path", action="store_true", help="Serve's HAProxy fast path (the cluster configs' mode) instead of the default Python proxy"
    )
    parser.add_argument(
        "--ray-lock", default=None, help="a lock file held (flock) only while Ray runs, on a machine where one Ray instance runs at a time"
    )
    args = parser.parse_args()
    if args.load_generator == "auto":
        args.load_generator = "wrk" if have_wrk() else "python"
    work = tempfile.mkdtemp(prefix="ray_app_text_bench_")
    texts, labels = reviews()
    fit, held = slice(0, args.fit_texts), slice(args.fit_texts, args.fit_texts + args.agreement_texts)
    results: dict = {"load_generator": args.load_generator}

    started = time.perf_counter()
    bundle = fitted_classifier(texts[fit], labels[fit])
    results["fit_s"] = time.perf_counter() - started
    held_out = arrays(bundle, texts[held])
    models, record = registered(work, bundle, held_out, labels[held])
    results["export"] = record
    results["agreement"] = agreement(record)

    payload_file = os.path.join(work, "one_text.json")
    with open(payload_file, "w") as f:
        json.dump({"texts": [texts[held][0]]}, f)
    results["footprint"] = {runtime: footprint(models, "text", runtime, payload_file) for runtime in ("torch", "onnx")}

    bodies = [json.dumps({"texts": [t]}).encode() for t in texts[held][:256]]
    port = unused_loopback_port()
    lock = open(args.ray_lock, "a") if args.ray_lock else None  # noqa: SIM115 - held until Ray is shut down
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    if args.fast_path:
        os.environ.update(SERVE_FAST_PATH_ENV)  # read by Ray's processes at start
    results["serve_mode"] = "haproxy" if args.fast_path else "default"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rounds: list[dict[str, list[dict]]] = []
    try:
        for _ in range(args.rounds):
            rounds.append(serve_variants(args, models, record, port, bodies))
    finally:
        serve.shutdown()
        ray.shutdown()
        if lock is not None:
            lock.close()
    # Per variant and concurrency: the round with the median req/s (one round: that round).
    results["rounds"] = rounds
    results["serving"] = {
        name: [
            sorted((r[name][i] for r in rounds), key=lambda row: row["req_per_s"])[len(rounds) // 2] for i in range(len(args.concurrency))
        ]
        for name in rounds[0]
    }

    e, a = record, results["agreement"]
    print(f"\ntext serving, MiniLM + fitted head (fit on {args.fit_texts} snippets in {results['fit_s']:.0f}s)")
    print(f"  export {e['export_s']:.1f}s: ONNX vs torch max |p diff| {e['parity']['max_abs_diff']:.2g} on {e['parity']['rows']} texts")
    i8 = e["int8"]
    print(
        f"  int8: accuracy {i8['accuracy_int8']:.4f} vs fp32 {i8['accuracy_fp32']:.4f} (change {i8['accuracy_change']:+.4f}, "
        f"tolerance {i8['tolerance']}, accepted {i8['accepted']}) on {i8['rows']} held-out texts"
    )
    print(f"  agreement on {a['texts']} texts: int8 vs fp32 {a['int8_vs_fp32']:.4f} (target >= 0.99); accuracy {a['accuracy']}")
    for runtime, f in results["footprint"].items():
        print(
            f"  replica footprint [{runtime}]: import {f['import_s']:.2f}s  load {f['load_s']:.2f}s  first answer {f['first_answer_s']:.3f}s  "
            f"total {f['total_s']:.2f}s  RSS {f['rss_mb']:.0f} MB (peak {f['peak_rss_mb']:.0f})  torch {f['torch_imported']}  transformers {f['transformers_imported']}"
        )
    ft, fo = results["footprint"]["torch"], results["footprint"]["onnx"]
    print(f"  footprint onnx / torch: time {fo['total_s'] / ft['total_s']:.2f}x  RSS {fo['rss_mb'] / ft['rss_mb']:.2f}x")
    for name, rows in results["serving"].items():
        for row in rows:
            print(
                f"  [{name}] c={row['concurrency']:3d}: {row['req_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}"
            )
    for name in [n for n in ("onnx_fp32", "onnx_int8") if n in results["serving"]]:
        for i, c in enumerate(args.concurrency):
            ratios = [r[name][i]["req_per_s"] / r["torch_fp32"][i]["req_per_s"] for r in rounds]
            each = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"  c={c:3d}: {name} / torch_fp32 = {statistics.median(ratios):.2f}x req/s (median of {len(ratios)} rounds: {each})")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/text_serving.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
