"""Offline behaviour features (issue 18): the point-in-time features of a click log, one pandas call
per user and per item (what ``groupby().map_groups`` did) against one vectorised call per shuffle
partition (what ``add_behaviour_features`` does now), on the same MovieLens-100K events in one run.
Both give the same columns (checked here); the ratio is events/s of the partition pass over the
per-group one. ``--ray`` also times ``add_behaviour_features`` end to end on a local 2-CPU Ray.

Run: ``python benchmarks/behaviour_offline.py [--events 20000] [--ray]`` (``make bench-behaviour``).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from ray_app.demos.clicks import MOVIELENS_BEHAVIOUR_OPTIONS, movielens_clicks
from ray_app.features.behaviour import BehaviourSpec, add_behaviour_features, behaviour_frame, item_history_features, user_history_features


def movielens_spec() -> BehaviourSpec:
    o = MOVIELENS_BEHAVIOUR_OPTIONS
    return BehaviourSpec(
        user_column=o["behaviour_user_column"],
        item_column=o["item_column"],
        time_column=o["time_column"],
        event_column=o["id_column"],
        label_column="click",
        category_column=o["behaviour_category_column"],
    )


def per_group(frame: pd.DataFrame, spec: BehaviourSpec) -> pd.DataFrame:
    users = pd.concat([user_history_features(g, spec) for _, g in frame.groupby(spec.user_column, sort=False)], ignore_index=True)
    return pd.concat([item_history_features(g, spec) for _, g in users.groupby(spec.item_column, sort=False)], ignore_index=True)


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--ray", action="store_true", help="also time add_behaviour_features on a local 2-CPU Ray")
    args = parser.parse_args()
    frame, spec = movielens_clicks(args.events), movielens_spec()
    print(f"{len(frame)} events, {frame[spec.user_column].nunique()} users, {frame[spec.item_column].nunique()} items")
    slow, slow_s = timed(per_group, frame, spec)
    fast, fast_s = timed(behaviour_frame, frame, spec)
    key = spec.event_column
    pd.testing.assert_frame_equal(
        slow.set_index(key).sort_index()[spec.numeric_columns()],
        fast.set_index(key).sort_index()[spec.numeric_columns()],
        check_dtype=False,
    )
    print(f"one call per group:     {slow_s:7.2f} s  {len(frame) / slow_s:10,.0f} events/s")
    print(f"one call per partition: {fast_s:7.2f} s  {len(frame) / fast_s:10,.0f} events/s  ({slow_s / fast_s:.0f}x)")
    if args.ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        from ray_app.runtime import quiet_data_progress

        quiet_data_progress()
        dataset = ray.data.from_pandas(frame).materialize()
        rows, ray_s = timed(lambda: add_behaviour_features(dataset, spec).count())
        print(f"Ray Data, 2 CPUs:       {ray_s:7.2f} s  {rows / ray_s:10,.0f} events/s (shuffles and task start-up included)")
        ray.shutdown()


if __name__ == "__main__":
    main()
