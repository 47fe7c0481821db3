"""Spot capacity on one machine: a worker node is reclaimed mid-training, and the job finishes.

Ray's ``fake_multinode`` provider starts worker "nodes" as extra raylets on this host. A cloud also
takes Spot/preemptible instances away on its own; :class:`ReclaimableFakeProvider` adds exactly
that: asked to reclaim a node (a file named after the node in ``provider.reclaim_dir``), the
provider terminates it and stops listing it, as EC2/GCE do with a reclaimed Spot VM. The
autoscaler, which runs the provider, sees the node go; Ray sees the raylet leave; Ray Train
restarts the training workers from the last checkpoint (``FailureConfig``), on a node the
autoscaler launches again if none has room.

    python -m ray_app.local_spot              # or: make demo-spot

Stops its cluster at the end (its own processes only), like the autoscaling demo.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from ray_app.local_cluster import DEFAULT_CONFIG, LocalCluster, start_local_cluster

PROVIDER_MODULE = "ray_app.local_spot.ReclaimableFakeProvider"
DONE_SUFFIX = ".reclaimed"


class ReclaimableFakeProvider(FakeMultiNodeProvider):
    """``fake_multinode`` plus Spot reclaims (named by ``provider.module`` in the config). Like its
    base, it only runs inside a head started with ``RAY_FAKE_CLUSTER=1``."""

    def non_terminated_nodes(self, tag_filters):
        # The autoscaler lists the nodes every update: the moment to act on a reclaim request.
        _reclaim_requested(self, self.provider_config["reclaim_dir"])
        return super().non_terminated_nodes(tag_filters)


def _reclaim_requested(provider: Any, reclaim_dir: str) -> None:
    folder = Path(reclaim_dir)
    if not folder.is_dir():
        return
    for request in folder.iterdir():
        node_id = request.name
        if node_id.endswith(DONE_SUFFIX) or not provider.is_running(node_id):
            continue
        # terminate_node kills the node's raylet and workers (SIGTERM first: a reclaim notice) and
        # forgets the node, so the next listing no longer has it.
        provider.terminate_node(node_id)
        (folder / f"{node_id}{DONE_SUFFIX}").write_text(f"{time.time()}\n")
        request.unlink()


def reclaimable_config(workdir: str | Path, config: str | Path = DEFAULT_CONFIG) -> tuple[Path, Path]:
    """A copy of the local autoscaling config whose provider can reclaim nodes; returns (config
    path, reclaim folder). Everything else (node types, idle timeout) is the file as shipped."""
    cluster_config = yaml.safe_load(Path(config).read_text())
    reclaim_dir = Path(workdir) / "reclaims"
    reclaim_dir.mkdir(parents=True, exist_ok=True)
    cluster_config["provider"] = {
        **cluster_config["provider"],
        "type": "external",
        "module": PROVIDER_MODULE,
        "reclaim_dir": str(reclaim_dir),
    }
    path = Path(workdir) / "reclaimable.yaml"
    path.write_text(yaml.safe_dump(cluster_config, sort_keys=False))
    return path, reclaim_dir


def start_reclaimable_cluster(workdir: str) -> tuple[LocalCluster, Path]:
    """The local autoscaling cluster (``start_local_cluster``) on the reclaiming provider."""
    config, reclaim_dir = reclaimable_config(workdir)
    return start_local_cluster(config, workdir=workdir), reclaim_dir


def reclaim(reclaim_dir: str | Path, node_id: str, timeout_s: float = 30) -> float:
    """Ask the provider to reclaim ``node_id``; returns when it has (seconds taken)."""
    started = time.monotonic()
    Path(reclaim_dir, node_id).write_text("reclaim\n")
    done = Path(reclaim_dir, f"{node_id}{DONE_SUFFIX}")
    while not done.exists():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the provider did not reclaim {node_id} within {timeout_s} s")
        time.sleep(0.2)
    return time.monotonic() - started


def training_worker_nodes(cluster: LocalCluster, job_id: str | None = None) -> list[str]:
    """Node IDs that host an alive Ray Train worker, of one Ray job if given (the nodes worth
    reclaiming)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster.dashboard_url, headers={"Content-Type": "application/json", **cluster.headers})
    actors = client.list(
        StateResource.ACTORS,
        options=ListApiOptions(
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), *([("job_id", "=", job_id)] if job_id else [])]
        ),
        raise_on_missing_output=False,
    )
    return sorted({actor.node_id for actor in actors})


def checkpoints(run_uri: str | Path) -> list[str]:
    folder = Path(run_uri)
    return sorted(p.name for p in folder.glob("checkpoint_*") if (p / "bundle.json").exists()) if folder.is_dir() else []


def registered_checkpoint(run_uri: str | Path) -> str | None:
    """The checkpoint Ray Train would restart from: the latest one its controller has registered
    (its checkpoint manager's snapshot in the run folder). A checkpoint folder on storage is not
    enough: reclaimed between the upload and the registration, a run restarts from the one before."""
    snapshot = Path(run_uri, "checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return latest["checkpoint_dir_name"] if latest else None


def train_job_entrypoint(workspace: str, run_name: str, epochs: int, batch_size: int = 16, python: str = "python") -> str:
    """Train only (the data is prepared), 2 workers with half a CPU each, as a user types it."""
    return (
        f"{python} -m ray_app image train --workspace {shlex.quote(workspace)} --run-name {shlex.quote(run_name)} "
        f"--num-workers 2 --cpus-per-worker 0.5 --epochs {epochs} --batch-size {batch_size} --max-failures 3"
    )


def run_through_a_reclaim(
    cluster: LocalCluster, reclaim_dir: Path, workspace: str, run_name: str, epochs: int, timeout_s: float = 300, log=print
) -> dict[str, Any]:
    """Submit training on prepared data, then ``reclaim_during_training``."""
    job_id = cluster.job_client().submit_job(
        entrypoint=train_job_entrypoint(workspace, run_name, epochs, python=shlex.quote(sys.executable)),
        submission_id=f"spot-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        metadata={"workload": "image", "stage": "train", "purpose": "spot reclaim demo"},
    )
    log(f"submitted {job_id}: {epochs} epochs, checkpoint every epoch")
    return reclaim_during_training(cluster, reclaim_dir, job_id, Path(workspace, "image", "runs", run_name), timeout_s, log)


def reclaim_during_training(
    cluster: LocalCluster, reclaim_dir: Path, job_id: str, run_uri: str | Path, timeout_s: float = 300, log=print
) -> dict[str, Any]:
    """For a submitted job that trains into ``run_uri`` (after other stages, if it has them, as in
    tests/test_live_cluster.py): wait until its first checkpoint is registered, reclaim a node that
    hosts one of its training workers, wait for the job to end. Returns what happened (status,
    reclaimed node, summary)."""
    from ray_app.local_cluster import stage_summaries, wait_for_job

    client = cluster.job_client()
    deadline = time.monotonic() + timeout_s
    while not registered_checkpoint(run_uri):
        if client.get_job_status(job_id).is_terminal() or time.monotonic() > deadline:
            return {"job_id": job_id, "status": client.get_job_status(job_id), "reclaimed": None, "logs": client.get_job_logs(job_id)}
        time.sleep(0.2)
    at_reclaim, registered = checkpoints(run_uri), registered_checkpoint(run_uri)
    # This job's training workers only (actors of earlier runs may still be listed).
    victims = training_worker_nodes(cluster, job_id=client.get_job_info(job_id).job_id)
    log(f"checkpoint {registered} registered; training workers on nodes {[v[-5:] for v in victims]}")
    reclaimed = victims[0] if victims else None
    if reclaimed:
        seconds = reclaim(reclaim_dir, reclaimed)
        log(f"node ...{reclaimed[-5:]} reclaimed by the provider ({seconds:.1f} s after the request)")
    status = wait_for_job(cluster, job_id, timeout_s=max(1.0, deadline - time.monotonic()))
    logs = client.get_job_logs(job_id)
    summary = stage_summaries(logs).get("train", {})
    log(f"job {job_id}: {status}; resumed at epoch(s) {summary.get('resumed_at')}, {summary.get('epochs_completed')} epochs done")
    return {
        "job_id": job_id,
        "status": status,
        "reclaimed": reclaimed,
        "checkpoints_at_reclaim": at_reclaim,
        # The one Ray Train had registered then (later folders may be written but not yet registered).
        "registered_at_reclaim": registered,
        "summary": summary,
        "logs": logs,
    }


def run_demo(images: int, epochs: int) -> int:
    from ray_app.demos.data import write_image_folders
    from ray_app.local_cluster import NodeWatcher, stop_local_cluster, submit_image_job, wait_for_job

    root = tempfile.mkdtemp(prefix="ray-app-spot-")
    folder, workspace = os.path.join(root, "digits"), os.path.join(root, "workspace")
    write_image_folders(folder, limit=images)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    cluster = None
    try:
        cluster, reclaim_dir = start_reclaimable_cluster(root)
        log(f"head with 0 CPUs and the autoscaler on the reclaiming provider; dashboard {cluster.dashboard_url}")
        watcher = NodeWatcher(cluster, on_change=lambda _, n: log(f"worker nodes alive: {n}")).start()
        prepared = submit_image_job(cluster, folder, workspace, epochs=1)  # prepare (+ a 1-epoch warm-up run)
        if str(wait_for_job(cluster, prepared, timeout_s=600)) != "SUCCEEDED":
            print(cluster.job_client().get_job_logs(prepared)[-5000:])
            return 1
        outcome = run_through_a_reclaim(cluster, reclaim_dir, workspace, "spot", epochs, log=log)
        watcher.stop()
        log(f"worker nodes over time: {' -> '.join(map(str, watcher.counts()))} ({len(watcher.seen)} launched in all)")
        if str(outcome["status"]) != "SUCCEEDED":
            print(outcome["logs"][-5000:])
            return 1
        return 0
    finally:
        if cluster is not None:
            stop_local_cluster(cluster)
            log("cluster stopped (its processes only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="MNIST digits to train on")
    # Enough epochs left after the first checkpoint for the reclaim to land mid-run: epochs after
    # the first run from worker memory in a second or two (at 4 it landed in the last one).
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    return run_demo(args.images, args.epochs)


if __name__ == "__main__":
    sys.exit(main())
