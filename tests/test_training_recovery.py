"""Checkpoint/resume by run name, and recovery from a training worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from ray_app import storage
from ray_app.cli import run_cli


@pytest.fixture(scope="module")
def prepared_workspace(trained_workspace, tmp_path_factory):
    """Fresh runs over the data the chain test already prepared (no second prepare)."""
    return trained_workspace["workspace"]


def _train(workspace: str, run_name: str, epochs: int, **extra: str) -> dict:
    args = [
        "image",
        "train",
        "--workspace",
        workspace,
        "--run-name",
        run_name,
        "--epochs",
        str(epochs),
        "--num-workers",
        "2",
        "--batch-size",
        "32",
    ]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return run_cli(args)


def test_rerun_with_same_name_resumes_from_last_checkpoint(prepared_workspace):
    first = _train(prepared_workspace, "resume", epochs=1)
    assert first["epochs_completed"] == 1 and first["resumed_at"] == []
    second = _train(prepared_workspace, "resume", epochs=2)
    # Continues at epoch 2, not 1: epoch 1 is in the history once, from the first run.
    assert second["resumed_at"] == [2]
    history = storage.read_json(os.path.join(prepared_workspace, "image", "runs", "resume", "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == first["metrics"] | {k: v for k, v in history[0].items() if k not in first["metrics"]}


def _training_worker_pids() -> list[int]:
    return [
        p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and any("RayTrainWorker" in part for part in p.info["cmdline"])
    ]


def test_killed_worker_recovers_from_last_checkpoint(prepared_workspace):
    run_dir = os.path.join(prepared_workspace, "image", "runs", "killed")
    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint() -> None:
        # The controller writes this snapshot once it has registered a reported checkpoint; a
        # checkpoint folder alone may not be registered yet, and the restart would start afresh.
        snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read()):
            time.sleep(0.2)
        pids = _training_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    summary = _train(prepared_workspace, "killed", epochs=3, max_failures="2")
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert summary["epochs_completed"] == 3
    # The worker group restarted from a checkpoint, not from scratch.
    assert summary["resumed_at"] and summary["resumed_at"][0] >= 2
    history = storage.read_json(os.path.join(run_dir, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
