"""Autoscaling, shown for real on one machine.

The Ray autoscaler runs with its ``fake_multinode`` provider (``cluster/local-autoscaling.yaml``):
the head has no CPUs, so a job's tasks and training workers wait until the autoscaler adds worker
"nodes" (extra raylets on this host); once the job is done and the nodes sit idle for
``idle_timeout_minutes`` they are removed again. The job is submitted through the Jobs API, as a
user would, with token authentication on (``RAY_AUTH_MODE=token``, the token from ``ray get-auth-token``).

    python -m ray_app.demos.autoscaling        # or: make demo-autoscaling

The cluster is stopped at the end: its own processes only, other Ray instances keep running.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from ray_app.demos.data import write_image_folders
from ray_app.local_cluster import (
    DEFAULT_CONFIG,
    NodeWatcher,
    stage_summaries,
    start_local_cluster,
    stop_local_cluster,
    submit_image_job,
    wait_for_job,
)


def run_demo(config: str, images: int, epochs: int) -> int:
    root = tempfile.mkdtemp(prefix="ray-app-autoscaling-")
    folder, workspace = os.path.join(root, "digits"), os.path.join(root, "workspace")
    write_image_folders(folder, limit=images)
    print(f"{images} MNIST digits in {folder}; starting a head with 0 CPUs and the autoscaler ({config})", flush=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    cluster = None
    try:
        cluster = start_local_cluster(config, workdir=root)
        log(f"dashboard {cluster.dashboard_url}  (GCS {cluster.gcs_address})")
        watcher = NodeWatcher(cluster, on_change=lambda _, n: log(f"worker nodes alive: {n}")).start()
        job_id = submit_image_job(cluster, folder, workspace, epochs)
        log(f"submitted job {job_id}")
        status = wait_for_job(cluster, job_id, timeout_s=600, on_status=lambda s: log(f"job {job_id}: {s}"))
        logs = cluster.job_client().get_job_logs(job_id)
        if str(status) != "SUCCEEDED":
            print(logs[-5000:])
            return 1
        metrics = stage_summaries(logs).get("train", {}).get("metrics", {})
        log("trained: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("train_loss", "val_loss", "val_accuracy") if k in metrics))
        log("waiting for the idle worker nodes to be removed (idle_timeout_minutes) ...")
        watcher.wait_for(lambda n: n == 0, timeout_s=180)
        watcher.stop()
        log(f"worker nodes over time: {' -> '.join(map(str, watcher.counts()))} ({len(watcher.seen)} launched in all)")
        print(f"job {job_id} {status}; its run (checkpoints, curves.png) is in {workspace}/image/runs/autoscaling")
        return 0
    finally:
        if cluster is not None:
            stop_local_cluster(cluster)
            log("cluster stopped (its processes only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.demos.autoscaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="autoscaler config (fake_multinode provider)")
    parser.add_argument("--images", type=int, default=1000, help="MNIST digits to train on")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    return run_demo(args.config, args.images, args.epochs)


if __name__ == "__main__":
    sys.exit(main())
