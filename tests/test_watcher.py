"""The upload watcher against a real Ray cluster started with ``ray start`` (token auth on): one
batch-predict job per uploaded file, exactly once across a watcher restart, lost records and a
cluster wipe. Every client is a separate process, as it would be for a user of the cluster."""

from __future__ import annotations

import json
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest
from ray_head import head_info, run, start_head, stop_head, wait_for

from ray_app.demos.data import write_image_folders
from ray_app.watcher import WatchSettings, is_candidate, output_name, submission_id

FINAL = {"SUCCEEDED", "FAILED", "STOPPED", "LOST"}


# ---- pure rules (no cluster) ---------------------------------------------------------------
def test_submission_id_is_stable_and_changes_with_the_file_version():
    first = submission_id("/ws/state", "/up/a.png", 100, 5)
    assert first == submission_id("/ws/state", "/up/a.png", 100, 5)
    others = {
        submission_id("/ws/state", "/up/a.png", 101, 5),  # re-uploaded, other size
        submission_id("/ws/state", "/up/a.png", 100, 6),  # re-uploaded, same size
        submission_id("/ws/state", "/up/b.png", 100, 5),
        submission_id("/ws/other-watch", "/up/a.png", 100, 5),
    }
    assert first not in others and len(others) == 4
    assert first.startswith("ray-app-watch-")


def test_candidates_skip_hidden_unmatched_and_still_changing_files(tmp_path):
    import pyarrow.fs as pafs

    for name in ("scan.png", ".scan.png.part", "_tmp.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    infos = {i.base_name: i for i in pafs.LocalFileSystem().get_file_info(pafs.FileSelector(str(tmp_path)))}
    now = time.time_ns()
    assert [n for n, i in sorted(infos.items()) if is_candidate(i, "*.png", 0, now)] == ["scan.png"]
    assert not is_candidate(infos["scan.png"], "*.png", 60, now)  # written just now: maybe still uploading
    assert is_candidate(infos["scan.png"], "*.png", 60, now + 61 * 10**9)


def test_settings_resolve_under_the_workspace_and_name_outputs_per_file(tmp_path):
    s = WatchSettings(workload="image", input="uploads", workspace=str(tmp_path)).resolved()
    assert s.input == os.path.abspath("uploads")
    assert s.state == str(tmp_path / "image" / "watch" / "state")
    assert s.output == str(tmp_path / "image" / "watch" / "predictions")
    sid = submission_id(s.state, "/in/day 1/a.png", 1, 1)
    name = output_name("/in", "/in/day 1/a.png", sid)
    assert name.startswith("day_1__a.png-") and "/" not in name


# ---- on a cluster -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    info = head_info(tmp_path_factory.mktemp("watch"))
    start_head(info)
    yield info
    stop_head()


def records(state: str) -> dict[str, dict]:
    if not os.path.isdir(state):
        return {}
    return {name[:-5]: json.load(open(os.path.join(state, name))) for name in os.listdir(state) if name.endswith(".json")}


def watch_jobs(info: dict) -> dict[str, object]:
    return {j.submission_id: j for j in info["client"].list_jobs() if (j.metadata or {}).get("ray_app") == "watch"}


def finished(state: str, count: int) -> dict[str, dict] | None:
    current = records(state)
    return current if len(current) == count and all(r["status"] in FINAL for r in current.values()) else None


@pytest.mark.own_cluster
def test_one_job_per_uploaded_file_exactly_once_across_restarts(cluster):
    folder = cluster["folder"]
    data, uploads, ws = folder / "digits", folder / "uploads", str(folder / "ws")
    write_image_folders(str(data), limit=120, broken=False)
    at = ["--address", cluster["address"], "--workspace", ws]
    run(cluster, "-m", "ray_app", "image", "prepare", *at, "--input", str(data))
    run(cluster, "-m", "ray_app", "image", "train", *at, "--run-name", "w", "--epochs", "1", "--num-workers", "1", "--batch-size", "16")
    run(cluster, "-m", "ray_app", "image", "register", *at, "--run-name", "w", "--alias", "production")
    classes = json.load(open(os.path.join(ws, "image", "prepared", "manifest.json")))["classes"]

    digits = sorted(str(p) for p in data.rglob("*.png"))
    uploads.mkdir()
    for name, source in zip(("a.png", "b.png"), digits, strict=False):
        shutil.copy(source, uploads / name)
    state = os.path.join(ws, "image", "watch", "state")

    def watcher(action: str) -> None:
        settings = ["--workload", "image", "--input", str(uploads), "--interval-s", "1", "--min-age-s", "0"]
        predict = ["--", "--concurrency", "1", "--batch-size", "8"]
        run(cluster, "-m", "ray_app.watcher", action, "--name", "test-watch", "--address", cluster["address"], "--workspace", ws,
            *(settings + predict if action != "stop" else []))  # fmt: skip

    # Two uploads -> two jobs, both succeed and write one prediction each.
    watcher("start")
    first = wait_for(lambda: finished(state, 2), "two finished jobs")
    jobs = watch_jobs(cluster)
    assert set(jobs) == set(first)
    assert {j.status.value for j in jobs.values()} == {"SUCCEEDED"}
    for record in first.values():
        assert record["status"] == "SUCCEEDED"
        rows = pq.read_table(os.path.join(record["output"], "status=ok")).to_pylist()
        assert [r["path"] for r in rows] == [record["file"]] and rows[0]["label"] in classes
    assert {os.path.basename(r["file"]) for r in first.values()} == {"a.png", "b.png"}

    # Kill the watcher, start a new one, upload a third file: one new job, nothing re-run.
    watcher("stop")
    watcher("start")
    shutil.copy(digits[2], uploads / "c.png")
    after = wait_for(lambda: finished(state, 3), "the third job")
    jobs_after = watch_jobs(cluster)
    assert len(jobs_after) == 3 and {j.status.value for j in jobs_after.values()} == {"SUCCEEDED"}
    for sid, job in jobs.items():
        assert jobs_after[sid].job_id == job.job_id and jobs_after[sid].start_time == job.start_time
    (new,) = set(after) - set(first)
    assert os.path.basename(after[new]["file"]) == "c.png"
    watcher("stop")

    # A record lost from the state folder: Ray refuses the same submission id, so still no re-run.
    lost = sorted(first)[0]
    os.remove(os.path.join(state, f"{lost}.json"))
    watcher("poll")
    assert len(watch_jobs(cluster)) == 3
    assert records(state)[lost]["status"] == "SUCCEEDED"

    # The whole cluster wiped (Ray forgets every job): the records alone prevent re-runs. Also left
    # behind: a pass that died between its two writes (d.png recorded SUBMITTING, never sent: it
    # is submitted now, once) and a job that was running when the cluster went (LOST, not re-run).
    stop_head()
    start_head(cluster)
    shutil.copy(digits[3], uploads / "d.png")
    d = os.stat(uploads / "d.png")
    d_sid = submission_id(state, str(uploads / "d.png"), d.st_size, d.st_mtime_ns)
    ghost = "ray-app-watch-" + "0" * 24
    for sid, path, status in ((d_sid, "d.png", "SUBMITTING"), (ghost, "deleted.png", "RUNNING")):
        with open(os.path.join(state, f"{sid}.json"), "w") as f:
            json.dump({"submission_id": sid, "file": str(uploads / path), "status": status}, f)
    watcher("start")
    final = wait_for(lambda: finished(state, 5), "the job for the file recorded half-way before the wipe")
    assert set(watch_jobs(cluster)) == {d_sid}
    assert final[d_sid]["status"] == "SUCCEEDED" and final[ghost]["status"] == "LOST"
    assert all(final[s]["status"] == "SUCCEEDED" for s in after)
