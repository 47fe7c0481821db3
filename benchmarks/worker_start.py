"""Worker start-up with and without ray_app.worker_start's GC hook, in one run.

Each round starts a fresh local Ray twice, without the hook and then with it (the hook reaches the
workers through the environment the raylet inherits, so it is chosen per Ray instance), and in each
starts ``--actors`` actors one after the other. Each actor imports what a training worker imports
(torch and Ray Train) in its constructor. Reported per side, as medians over all actors:
- ``ready_s``: ``Actor.remote()`` until its first method call returns (process start, Ray's own
  imports, the hook, the constructor's imports);
- ``import_cpu_s``: the CPU time of the constructor's imports, measured inside the actor.

Run: ``python benchmarks/worker_start.py [--rounds 2] [--actors 5]`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ray

from ray_app.worker_start import hook_env


@ray.remote(num_cpus=0)
class TrainingWorkerImports:
    def __init__(self) -> None:
        import gc

        wall, cpu = time.perf_counter(), time.process_time()
        import ray.train.torch  # noqa: F401
        import torch  # noqa: F401

        self.measured = {
            "import_cpu_s": time.process_time() - cpu,
            "import_wall_s": time.perf_counter() - wall,
            "gc_threshold": gc.get_threshold()[0],
        }

    def measured_imports(self) -> dict:
        return self.measured


def one_side(hook: bool, actors: int) -> list[dict]:
    (name, value) = next(iter(hook_env().items()))
    if hook:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for _ in range(actors):
            started = time.perf_counter()
            actor = TrainingWorkerImports.remote()
            row = ray.get(actor.measured_imports.remote())
            rows.append({"ready_s": time.perf_counter() - started, **row})
            ray.kill(actor)
            time.sleep(0.5)  # the killed process exits before the next one starts
        return rows
    finally:
        ray.shutdown()
        os.environ.pop(name, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating without/with pairs")
    parser.add_argument("--actors", type=int, default=5, help="actor starts per side and round")
    parser.add_argument("--output", default="benchmarks/results/worker_start.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for side in ("without", "with"):
            runs[side] += one_side(side == "with", args.actors)
    for side, rows in runs.items():
        expected = 700 if side == "without" else None
        if expected and any(r["gc_threshold"] != expected for r in rows):
            raise SystemExit(f"{side}: a worker ran with another GC threshold: {rows}")
        if side == "with" and any(r["gc_threshold"] == 700 for r in rows):
            raise SystemExit(f"the hook did not run in a worker: {rows}")
    median = {
        side: {k: round(statistics.median(r[k] for r in rows), 3) for k in ("ready_s", "import_cpu_s")} for side, rows in runs.items()
    }
    result = {
        "actors_per_side": len(runs["with"]),
        "median": median,
        "ratios_with_over_without": {k: round(median["with"][k] / median["without"][k], 2) for k in ("ready_s", "import_cpu_s")},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("actors_per_side", "median", "ratios_with_over_without")}, indent=2))


if __name__ == "__main__":
    main()
