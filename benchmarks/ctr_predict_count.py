"""Counting a click log before batch predict: the behaviour-featured rows (what predict counted
before) against the log itself (``CTRWorkload.count_predict_inputs``), in one run.

Run: ``python benchmarks/ctr_predict_count.py [--events 10000] [--repeats 3]`` (``make bench-ctr-count``).
MovieLens-100K events (the demo's click log) as Parquet, the demo's behaviour options; one local
Ray (2 CPUs). The two ways alternate; both must give the same number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import ray

from ray_app.demos.clicks import MOVIELENS_BEHAVIOUR_OPTIONS, movielens_clicks
from ray_app.workloads.ctr import CTROptions, CTRWorkload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workload, options = CTRWorkload(), CTROptions(**MOVIELENS_BEHAVIOUR_OPTIONS)
    with tempfile.TemporaryDirectory() as folder:
        log = os.path.join(folder, "clicks.parquet")
        movielens_clicks(args.events).to_parquet(log, index=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            times: dict[str, list[float]] = {"featured rows (before)": [], "the log itself (now)": []}
            counts = set()
            for _ in range(args.repeats):
                items = workload.read_predict_inputs(log, options, batch_size=256)
                started = time.perf_counter()
                counts.add(items.count())
                times["featured rows (before)"].append(time.perf_counter() - started)
                started = time.perf_counter()
                counts.add(workload.count_predict_inputs(items, [log]))
                times["the log itself (now)"].append(time.perf_counter() - started)
        finally:
            ray.shutdown()
    assert counts == {args.events}, f"the two counts differ: {counts}"
    medians = {name: statistics.median(values) for name, values in times.items()}
    # The first count of a driver pays the shuffle's actor start-ups (what a `ray-app ctr predict`
    # run pays); later ones in the same driver find them warm.
    print(f"{args.events} events with behaviour features, {args.repeats} alternating counts each")
    for name, values in times.items():
        print(f"  {name:<24} first {values[0]:6.2f} s, median {medians[name]:6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    before, now = medians.values()
    print(
        f"saved per predict: {times['featured rows (before)'][0] - times['the log itself (now)'][0]:.2f} s first, {before - now:.2f} s median"
    )


if __name__ == "__main__":
    main()
