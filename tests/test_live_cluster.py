"""A real cluster on this machine: ``ray start --head`` with the Ray autoscaler and its
``fake_multinode`` provider (cluster/local-autoscaling.yaml), token authentication on, work
submitted through the Jobs API as a user would.

These tests start and stop their own Ray cluster (``ray start``; its processes only are stopped at
the end), so they cannot share a process with the main suite's Ray instance: ``make test`` runs
them in a second pytest process (``pytest -m own_cluster``), beside the main one. They do not use that process's shared head (tests/ray_head.py)
either: the autoscaler only manages a head started with ``--autoscaling-config`` and, to show nodes
coming and going, the head must have no CPUs, so every task waits for a node; and Serve, which the
other own-cluster tests run, would start a proxy on each fake node, all on this one machine and port.
This module runs first in the process; its last test starts the shared head and then stops this
cluster beside it.

One job carries every scenario: prepare + train with a checkpoint per epoch, a node that hosts a
training worker reclaimed by the provider after the first checkpoint (Spot capacity), the run
resumed by Ray Train, then the autoscaler removing the idle nodes.
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest
import yaml
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus

from ray_app.demos.data import write_image_folders
from ray_app.local_cluster import (
    DEFAULT_CONFIG,
    RUN_NAME,
    NodeWatcher,
    cluster_processes,
    image_job_entrypoint,
    stage_summaries,
    stop_local_cluster,
    submit_image_job,
)
from ray_app.local_spot import reclaim_during_training, start_reclaimable_cluster

pytestmark = pytest.mark.own_cluster

IMAGES = 200
# A checkpoint each; the reclaim lands once the first is registered, with epochs still to run. At
# 2, training that reads its small splits once finished epoch 2 before the reclaim landed; at 3,
# once epochs after the first ran from worker memory (engine/train.py), epochs 2 and 3 did. With
# workers that start faster (ray_app.worker_start) 3 checkpoints were written within 0.25 s of
# the first: 12 leaves the reclaim a margin at ~0.1 s an epoch.
EPOCHS = 12
JOB_TIMEOUT_S = 480  # ~1.5 min here; generous for a loaded 2-core machine
SCALE_DOWN_TIMEOUT_S = 180  # idle_timeout_minutes is 0.2 (12 s); nodes go a few seconds after that


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(cluster_dir):
    with pytest.MonkeyPatch.context() as mp:
        # The Jobs client always prefers these over the address it is given.
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        # cluster/local-autoscaling.yaml on fake_multinode's provider extended to reclaim nodes
        # on request, like Spot capacity (ray_app.local_spot); until asked, it is fake_multinode.
        started = start_reclaimable_cluster(str(cluster_dir))[0]
        try:
            yield started
        finally:
            stop_local_cluster(started)


@pytest.fixture(scope="module")
def finished_job(cluster, cluster_dir, tmp_path_factory):
    """prepare + train submitted as one job while a thread counts the alive worker nodes; once the
    first checkpoint is registered, the provider reclaims a node that hosts a training worker."""
    root = tmp_path_factory.mktemp("job")
    images, workspace = str(root / "digits"), str(root / "workspace")
    write_image_folders(images, limit=IMAGES)  # + 5 broken files that prepare must reject
    watcher = NodeWatcher(cluster, interval_s=1.0).start()
    job_id = submit_image_job(cluster, images, workspace, epochs=EPOCHS)
    run_uri = os.path.join(workspace, "image", "runs", RUN_NAME)
    outcome = reclaim_during_training(cluster, cluster_dir / "reclaims", job_id, run_uri, timeout_s=JOB_TIMEOUT_S, log=lambda _: None)
    yield {
        **outcome,
        "info": cluster.job_client().get_job_info(job_id),
        "watcher": watcher,
        "workspace": workspace,
    }
    watcher.stop()


def test_cluster_starts_with_token_auth_and_no_worker_nodes(cluster):
    from ray.job_submission import JobSubmissionClient

    assert cluster.worker_nodes() == []
    # Token auth is on: the same request without the token is refused.
    with pytest.raises(AuthenticationError, match="Invalid authentication token"):
        JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer not-the-token"}).list_jobs()


def test_job_submission_trains_and_reports(finished_job):
    job = finished_job
    assert job["status"] == JobStatus.SUCCEEDED, job["logs"][-4000:]

    info = job["info"]
    assert info.submission_id == job["job_id"]
    assert job["job_id"].startswith("image-train-")
    assert info.metadata == {"workload": "image", "stage": "prepare+train", "who": info.metadata["who"], "purpose": "autoscaling demo"}
    assert info.metadata["who"]
    assert "-m ray_app image prepare" in info.entrypoint and "-m ray_app image train" in info.entrypoint

    summaries = stage_summaries(job["logs"])
    prepared, trained = summaries["prepare"], summaries["train"]
    assert prepared["rows_ok"] == IMAGES and prepared["rows_rejected"] == 5
    assert prepared["rows_in"] == prepared["rows_ok"] + prepared["rows_rejected"]
    metrics = trained["metrics"]
    assert trained["epochs_completed"] == EPOCHS and metrics["epoch"] == EPOCHS
    assert metrics["train_rows"] + metrics["val_rows"] <= IMAGES
    assert metrics["val_rows"] == prepared["splits"]["val"]
    assert 0 < metrics["train_loss"] < 10 and 0 < metrics["val_loss"] < 10
    assert 0 <= metrics["val_accuracy"] <= 1
    # The checkpoint the job reports is on disk, in the workspace the job was given.
    assert trained["checkpoint"].startswith(job["workspace"])
    assert os.path.isfile(os.path.join(trained["checkpoint"], "model.safetensors"))


def test_training_survives_a_spot_reclaim_of_its_node(cluster, finished_job):
    """Spot capacity goes away on its own: the provider reclaims a node that hosts a training
    worker after the first checkpoint. The autoscaler sees the node go, Ray Train restarts the
    workers from the last checkpoint, and the job succeeds with every epoch done, without anyone
    resubmitting (the scale-down test then still sees the node counts end at 0)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    outcome = finished_job
    reclaimed = outcome["reclaimed"]
    assert reclaimed, f"no training worker found to reclaim: {outcome['status']}\n{outcome['logs'][-3000:]}"
    assert outcome["status"] == JobStatus.SUCCEEDED, outcome["logs"][-4000:]
    # The reclaimed node is gone for Ray too (not merely idle), and it never came back.
    state = StateApiClient(address=cluster.dashboard_url, headers={"Content-Type": "application/json", **cluster.headers})
    (node,) = state.list(StateResource.NODES, options=ListApiOptions(filters=[("node_id", "=", reclaimed)]), raise_on_missing_output=False)
    assert node.state == "DEAD"
    assert reclaimed not in cluster.worker_nodes()
    # Finished from a checkpoint taken before the reclaim, once, with every epoch done.
    summary = outcome["summary"]
    assert summary["epochs_completed"] == EPOCHS
    assert len(summary["resumed_at"]) == 1, (summary, outcome["logs"][-3000:])
    (resumed_at,) = summary["resumed_at"]
    # From the checkpoint registered when the reclaim was asked for, or a later one. Not from every
    # folder then on disk: epochs that run from worker memory write a checkpoint every ~0.1 s here,
    # and a folder is written before the controller registers it (3 folders, the first registered).
    at_reclaim, registered = outcome["checkpoints_at_reclaim"], outcome["registered_at_reclaim"]
    assert 2 <= at_reclaim.index(registered) + 2 <= resumed_at <= EPOCHS, (at_reclaim, registered, resumed_at)


def test_autoscaler_adds_nodes_for_the_job_and_removes_them_when_idle(finished_job):
    job, watcher = finished_job, finished_job["watcher"]
    assert job["status"] == JobStatus.SUCCEEDED, job["logs"][-4000:]
    max_workers = yaml.safe_load(DEFAULT_CONFIG.read_text())["available_node_types"]["ray.worker.cpu"]["max_workers"]

    assert watcher.samples[0][1] == 0, "the head has no CPUs and the cluster starts with no worker nodes"
    peak = max(count for _, count in watcher.samples)
    assert 1 <= peak <= max_workers
    assert watcher.seen, "worker nodes were launched for the job"

    assert watcher.wait_for(lambda count: count == 0, timeout_s=SCALE_DOWN_TIMEOUT_S), watcher.counts()
    counts = watcher.counts()
    assert counts[0] == 0 and counts[-1] == 0 and max(counts) >= 1, counts


def test_job_entrypoint_is_the_documented_cli_quoted_for_the_shell():
    """The job runs exactly what a user types (python -m ray_app ...); paths with spaces survive."""
    command = image_job_entrypoint("/data/my scans", "/shared/ws", epochs=2, python=shlex.quote(sys.executable))
    prepare, train = command.split(" && ")
    assert shlex.split(prepare)[1:] == ["-m", "ray_app", "image", "prepare", "--input", "/data/my scans", "--workspace", "/shared/ws"]
    train_args = shlex.split(train)
    assert train_args[1:5] == ["-m", "ray_app", "image", "train"]
    assert train_args[train_args.index("--epochs") + 1] == "2"
    assert train_args[train_args.index("--cpus-per-worker") + 1] == "0.5"


def test_stopping_a_cluster_leaves_other_ray_instances_running(cluster, finished_job, shared_head):
    """``stop_local_cluster`` stops its own cluster's processes (fake nodes included) and nothing
    else: the session's shared head (another ``ray start``), and the main suite's Ray that
    ``make test`` runs beside this process, keep running. ``ray stop --force`` would kill them all."""
    other = cluster_processes(shared_head["address"])
    assert other, "the shared head's processes were found"
    assert len(cluster_processes(cluster.gcs_address)) > 1
    stop_local_cluster(cluster)  # the fixture's teardown then finds nothing left to stop
    assert cluster_processes(cluster.gcs_address) == []
    assert all(p.is_running() for p in other)
    assert shared_head["client"].list_jobs() is not None  # the other head still answers
