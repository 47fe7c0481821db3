"""Checkpoint/resume by run name, and recovery from a training worker killed mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.engine.train import ResumeRefused


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
        args += [f"--{key.replace('_', '-')}", *([value] if value else [])]
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


def _checkpoints(run_dir: str) -> list[str]:
    # Checkpoint folders only (Ray's checkpoint_manager_snapshot.json shares the prefix).
    return sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, n)))


def test_finished_run_returns_at_once_and_changed_runs_are_refused(prepared_workspace, tmp_path):
    """After the resume test: the run has 2 epochs. Asking for 2 again trains nothing and starts
    no workers; other data, other classes or another model option is refused before any worker
    starts; --fresh starts over and drops the old run only once the new one is complete."""
    run_dir = os.path.join(prepared_workspace, "image", "runs", "resume")
    before = _checkpoints(run_dir)
    done = _train(prepared_workspace, "resume", epochs=2)
    assert done["already_complete"] and not done["trained"] and done["epochs_completed"] == 2
    assert _checkpoints(run_dir) == before  # no worker ran, nothing was written

    with pytest.raises(ResumeRefused, match=r"--width 16 -> 8.*--fresh"):
        _train(prepared_workspace, "resume", epochs=3, width="8")
    # Same data under another name with one more manifest entry: another fingerprint.
    changed = str(tmp_path / "changed")
    shutil.copytree(os.path.join(prepared_workspace, "image", "prepared"), changed)
    manifest = storage.read_json(os.path.join(changed, "manifest.json"))
    storage.write_json(os.path.join(changed, "manifest.json"), {**manifest, "note": "re-prepared"})
    with pytest.raises(ResumeRefused, match="prepared data changed"):
        _train(prepared_workspace, "resume", epochs=3, data=changed)
    storage.write_json(os.path.join(changed, "manifest.json"), {**manifest, "classes": [*manifest["classes"][:-1], "ten"]})
    with pytest.raises(ResumeRefused, match="classes"):
        _train(prepared_workspace, "resume", epochs=3, data=changed)
    assert _checkpoints(run_dir) == before

    fresh = _train(prepared_workspace, "resume", epochs=1, width="8", fresh="")
    assert fresh["trained"] and fresh["resumed_at"] == [] and fresh["epochs_completed"] == 1
    assert not set(_checkpoints(run_dir)) & set(before)
    assert not [n for n in os.listdir(os.path.dirname(run_dir)) if n.startswith("resume.replaced-")]


def _training_worker_pids() -> list[int]:
    return [
        p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and any("RayTrainWorker" in part for part in p.info["cmdline"])
    ]


def _newest_checkpoint_is_mid_epoch(run_dir: str) -> bool:
    names = _checkpoints(run_dir)
    try:
        return bool(names) and storage.read_json(os.path.join(run_dir, names[-1], "bundle.json"))["training"]["rows_in_epoch"] > 0
    except (OSError, ValueError, KeyError):  # still being written
        return False


def test_killed_worker_resumes_mid_epoch_from_a_step_checkpoint(prepared_workspace):
    """Checkpoints every step: a worker killed mid-epoch costs a step, not the epoch. The restart
    skips the batches the epoch had already trained instead of training them again."""
    run_dir = os.path.join(prepared_workspace, "image", "runs", "killed")
    killed: list[int] = []

    def kill_a_worker_after_a_step_checkpoint() -> None:
        # The controller writes this snapshot once it has registered a reported checkpoint; a
        # checkpoint folder alone may not be registered yet, and the restart would start afresh.
        snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        deadline = time.time() + 240
        while time.time() < deadline and not (
            os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read() and _newest_checkpoint_is_mid_epoch(run_dir)
        ):
            time.sleep(0.1)
        pids = _training_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_a_worker_after_a_step_checkpoint, daemon=True)
    killer.start()
    summary = _train(prepared_workspace, "killed", epochs=3, max_failures="2", checkpoint_every_steps="1")
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert summary["epochs_completed"] == 3
    history = storage.read_json(os.path.join(run_dir, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The worker group restarted from a checkpoint inside an epoch, not from scratch ...
    (resumed,) = summary["resumed_from"]
    assert resumed["rows_in_epoch"] > 0 and summary["resumed_at"] == [resumed["epoch"] + 1]
    # ... and that epoch trained only the batches after it: fewer rows than a whole epoch.
    full_epoch = max(h["train_rows"] for h in history)
    assert history[resumed["epoch"]]["train_rows"] == full_epoch - resumed["rows_in_epoch"]
