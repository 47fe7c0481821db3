"""Checkpoint/resume by run name, and recovery from a training worker killed mid-run.

One run carries all three: a 2-worker run loses a worker mid-epoch and finishes from a step
checkpoint; asked for one more epoch under the same name it resumes; asked again it trains
nothing, and changed data or options are refused until --fresh. (Each separate run used to pay
its own trainer start-ups.) The tests run in this order and each starts from the last one's run.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
from own_processes import own_processes

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.engine.train import ResumeRefused

RUN = "recovery"


@pytest.fixture(scope="module")
def prepared_workspace(trained_workspace, tmp_path_factory):
    """Fresh runs over the data the chain test already prepared (no second prepare)."""
    return trained_workspace["workspace"]


def _run_dir(workspace: str) -> str:
    return os.path.join(workspace, "image", "runs", RUN)


def _train(workspace: str, epochs: int, num_workers: int = 1, **extra: str) -> dict:
    args = ["image", "train", "--workspace", workspace, "--run-name", RUN, "--epochs", str(epochs),
            "--num-workers", str(num_workers), "--batch-size", "32"]  # fmt: skip
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", *([value] if value else [])]
    return run_cli(args)


def _checkpoints(run_dir: str) -> list[str]:
    # Checkpoint folders only (Ray's checkpoint_manager_snapshot.json shares the prefix).
    return sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, n)))


def _training_worker_pids() -> list[int]:
    return [p.pid for p in own_processes("RayTrainWorker")]


def _newest_checkpoint_is_mid_epoch(run_dir: str) -> bool:
    names = _checkpoints(run_dir)
    try:
        return bool(names) and storage.read_json(os.path.join(run_dir, names[-1], "bundle.json"))["training"]["rows_in_epoch"] > 0
    except (OSError, ValueError, KeyError):  # still being written
        return False


def test_killed_worker_resumes_mid_epoch_from_a_step_checkpoint(prepared_workspace):
    """Step checkpoints: a worker killed mid-epoch costs a few steps, not the epoch. The restart
    skips the batches the epoch had already trained instead of training them again. Two workers
    (DDP): one dies, the group restarts."""
    run_dir = _run_dir(prepared_workspace)
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
    # 8 steps an epoch (478 rows, 2 × 32 a step): a checkpoint every 2 steps is 3 inside each epoch.
    # Streamed splits (Ray Data's split per rank, as on data too large to hold in memory): the other
    # runs of the suite hold their small splits in memory, so this run covers the streaming path.
    summary = _train(prepared_workspace, epochs=2, num_workers=2, max_failures="2", checkpoint_every_steps="2", stream_splits="")
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert summary["epochs_completed"] == 2
    history = storage.read_json(os.path.join(run_dir, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    # The worker group restarted from a checkpoint inside an epoch, not from scratch ...
    (resumed,) = summary["resumed_from"]
    assert resumed["rows_in_epoch"] > 0 and summary["resumed_at"] == [resumed["epoch"] + 1]
    # ... and that epoch trained only the batches after it: fewer rows than a whole epoch.
    full_epoch = max(h["train_rows"] for h in history)
    assert history[resumed["epoch"]]["train_rows"] == full_epoch - resumed["rows_in_epoch"]


def test_rerun_with_same_name_resumes_from_last_checkpoint(prepared_workspace):
    """The run has 2 epochs (above); asking for 3 under the same name continues at epoch 3, not 1,
    with one worker where the run had two: the epochs already trained stay in the history once."""
    history_file = os.path.join(_run_dir(prepared_workspace), "history.json")
    before = storage.read_json(history_file)
    assert [h["epoch"] for h in before] == [1, 2]
    third = _train(prepared_workspace, epochs=3)
    assert third["trained"] and third["epochs_completed"] == 3 and third["resumed_at"][-1] == 3
    history = storage.read_json(history_file)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == before
    assert history[-1] == third["metrics"] | {k: v for k, v in history[-1].items() if k not in third["metrics"]}


def test_finished_run_returns_at_once_and_changed_runs_are_refused(prepared_workspace, tmp_path):
    """After the resume test: the run has 3 epochs. Asking for 3 again trains nothing and starts
    no workers; other data, other classes or another model option is refused before any worker
    starts; --fresh starts over and drops the old run only once the new one is complete."""
    run_dir = _run_dir(prepared_workspace)
    before = _checkpoints(run_dir)
    done = _train(prepared_workspace, epochs=3)
    assert done["already_complete"] and not done["trained"] and done["epochs_completed"] == 3
    assert _checkpoints(run_dir) == before  # no worker ran, nothing was written

    with pytest.raises(ResumeRefused, match=r"--width 16 -> 8.*--fresh"):
        _train(prepared_workspace, epochs=4, width="8")
    # Same data under another name with one more manifest entry: another fingerprint.
    changed = str(tmp_path / "changed")
    shutil.copytree(os.path.join(prepared_workspace, "image", "prepared"), changed)
    manifest = storage.read_json(os.path.join(changed, "manifest.json"))
    storage.write_json(os.path.join(changed, "manifest.json"), {**manifest, "note": "re-prepared"})
    with pytest.raises(ResumeRefused, match="prepared data changed"):
        _train(prepared_workspace, epochs=4, data=changed)
    storage.write_json(os.path.join(changed, "manifest.json"), {**manifest, "classes": [*manifest["classes"][:-1], "ten"]})
    with pytest.raises(ResumeRefused, match="classes"):
        _train(prepared_workspace, epochs=4, data=changed)
    assert _checkpoints(run_dir) == before

    fresh = _train(prepared_workspace, epochs=1, width="8", fresh="")
    assert fresh["trained"] and fresh["resumed_at"] == [] and fresh["epochs_completed"] == 1
    assert not set(_checkpoints(run_dir)) & set(before)
    assert not [n for n in os.listdir(os.path.dirname(run_dir)) if n.startswith(f"{RUN}.replaced-")]
