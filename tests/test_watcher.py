"""The upload watcher against a real Ray cluster started with ``ray start`` (token auth on): the new
files of a poll grouped into one batch-predict job, each file at most once across a watcher
restart, lost records and a cluster wipe (reconciled with the job's output), and `retry` of a lost
file. Every client is a separate process, as it would be for a user of the cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from ray_head import run, start_head, stop_head, wait_for

from ray_app import storage
from ray_app.demos.data import write_image_folders
from ray_app.watcher import RetryRefused, Watch, WatchSettings, group_files, is_candidate, job_id, output_name, submission_id

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


def test_job_ids_are_deterministic_per_group_and_attempt():
    a, b = submission_id("/s", "/up/a.png", 1, 1), submission_id("/s", "/up/b.png", 1, 1)
    assert job_id([a]) == a  # a file alone keeps the id its job had before grouping
    assert job_id([a, b]) == job_id([b, a]) != job_id([a])
    assert job_id([a, b], attempt=1) not in {job_id([a, b]), a, b}
    assert job_id([a], attempt=1) != a


def test_new_files_are_grouped_per_poll_or_per_finished_folder():
    files = [{"file_id": str(i), "file": f"/up/{'day1' if i < 3 else 'day2'}/{i}.png"} for i in range(5)]
    assert [len(g) for g in group_files(files, 1000)] == [5]
    assert [len(g) for g in group_files(files, 2)] == [2, 2, 1]
    assert group_files(files, 1000, marker_folders={"/up/day2"}) == [files[3:]]  # day1 has no _SUCCESS yet
    assert group_files(files, 1000, marker_folders=set()) == []


def _watch(tmp_path, **extra) -> Watch:
    return Watch(WatchSettings(workload="image", input=str(tmp_path / "up"), workspace=str(tmp_path / "ws"), **extra))


def _record(watch: Watch, name: str, status: str, attempt: int = 0) -> dict:
    fid = submission_id(watch.settings.state, f"/up/{name}", 1, 1)
    record = {"file_id": fid, "file": f"/up/{name}", "size": 1, "mtime_ns": 1, "job": job_id([fid], attempt)}
    record |= {"output": f"/ws/out/{name}", "status": status, "attempt": attempt}
    watch._write_record(record)
    return record


def test_retry_refuses_unknown_unfinished_succeeded_and_over_the_limit_files(tmp_path):
    watch = _watch(tmp_path, max_retries=2)
    _record(watch, "ok.png", "SUCCEEDED")
    _record(watch, "running.png", "RUNNING")
    _record(watch, "worn.png", "FAILED", attempt=2)
    for files, reason in (
        (["/up/never.png"], "has not seen this file"),
        (["/up/ok.png"], "is SUCCEEDED"),
        (["/up/running.png"], "is RUNNING"),
        (["/up/worn.png"], "already retried 2 times (max_retries=2)"),
    ):
        with pytest.raises(RetryRefused, match=re.escape(reason)):
            watch.retry(files)
    with pytest.raises(RetryRefused, match="worn.png"):
        watch.retry(failed=True)  # all failed files: the one over the limit refuses the lot


def test_a_job_forgotten_by_the_cluster_is_finished_when_its_output_summary_exists(tmp_path):
    watch = _watch(tmp_path)
    output = str(tmp_path / "ws" / "image" / "watch" / "predictions" / "two")
    job = {"submission_id": "ray-app-watch-x", "files": [{"file": "/up/a.png"}, {"file": "/up/b.png"}], "output": output}
    job["input_list"] = watch.job_uri("ray-app-watch-x", ".inputs.txt")
    assert watch.finished_output(job) is None  # no output: it did not finish
    with storage.publishing(output) as staging:
        storage.write_json(storage.join(staging.uri, "summary.json"), {"input": job["input_list"], "rows_in": 2})
    assert watch.finished_output(job)["rows_in"] == 2
    assert watch.finished_output(job | {"input_list": "/elsewhere.txt"}) is None  # another job's output


def test_a_truncated_or_missing_file_record_is_rebuilt_from_its_job_and_nothing_reruns(tmp_path):
    """Faults in the state folder (a torn write, a pass killed between the job record and the
    file records): the files stay claimed by their finished job. No Ray call is needed, and none
    is made: poll() would fail without a cluster if it tried to submit."""
    watch = _watch(tmp_path, min_age_s=0)
    (tmp_path / "up").mkdir()
    files = []
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "up" / name).write_bytes(b"x")
        info = pafs.LocalFileSystem().get_file_info(str(tmp_path / "up" / name))
        fid = submission_id(watch.settings.state, info.path, info.size, info.mtime_ns)
        files.append({"file_id": fid, "file": info.path, "size": info.size, "mtime_ns": info.mtime_ns})
    sid = job_id([f["file_id"] for f in files])
    watch._write_job({"submission_id": sid, "files": files, "output": "/ws/out", "status": "SUCCEEDED", "attempt": 0})
    a, b, _ = (watch.record_uri(f["file_id"]) for f in files)
    watch._write_record({**files[0], "job": sid, "output": "/ws/out", "status": "SUCCEEDED", "attempt": 0})
    with open(a, "r+") as f:
        f.truncate(20)  # torn write
    assert not os.path.exists(b)  # killed before b's and c's records were written
    result = watch.poll()
    assert result["submitted"] == [] and result["already_known"] == 3
    rebuilt = watch.records()
    assert {r["job"] for r in rebuilt.values()} == {sid} and {r["status"] for r in rebuilt.values()} == {"SUCCEEDED"}
    assert len(rebuilt) == 3


def test_a_marked_folder_becomes_one_job_recorded_before_it_is_submitted(tmp_path):
    """With --marker _SUCCESS only finished upload folders are taken, each as one job; the job and
    its files are on record before the submission (here to an unreachable cluster, which fails)."""
    watch = _watch(tmp_path, min_age_s=0, marker="_SUCCESS", dashboard_address="http://127.0.0.1:1")
    for day, names in (("day1", ["a.png", "b.png"]), ("day2", ["c.png", "d.png", "e.png"])):
        (tmp_path / "up" / day).mkdir(parents=True)
        for name in names:
            (tmp_path / "up" / day / name).write_bytes(b"x")
    assert watch.poll()["submitted"] == []  # no folder is finished yet: nothing is even recorded
    assert watch.records() == {}
    (tmp_path / "up" / "day2" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(ConnectionError, match="Failed to connect to Ray"):
        watch.poll()
    (job,) = watch.jobs().values()
    assert job["status"] == "SUBMITTING" and [os.path.basename(f["file"]) for f in job["files"]] == ["c.png", "d.png", "e.png"]
    assert open(job["input_list"]).read().split() == [f["file"] for f in job["files"]]
    assert {r["job"] for r in watch.records().values()} == {job["submission_id"]} and len(watch.records()) == 3


# ---- on a cluster -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(shared_head):
    """The session's shared head (tests/ray_head.py); the wipe below restarts it in place."""
    return shared_head


def records(state: str) -> dict[str, dict]:
    if not os.path.isdir(state):
        return {}
    return {name[:-5]: json.load(open(os.path.join(state, name))) for name in os.listdir(state) if name.endswith(".json")}


def watch_jobs(info: dict) -> dict[str, object]:
    return {j.submission_id: j for j in info["client"].list_jobs() if (j.metadata or {}).get("ray_app") == "watch"}


def finished(state: str, count: int) -> dict[str, dict] | None:
    current = records(state)
    return current if len(current) == count and all(r["status"] in FINAL for r in current.values()) else None


def _claim(state: str, sid: str, files: list[dict], status: str, output: str) -> None:
    """Job + file records as a watcher pass writes them (used to recreate what a kill left)."""
    os.makedirs(os.path.join(state, "jobs"), exist_ok=True)
    job = {"submission_id": sid, "files": files, "output": output, "status": status, "attempt": 0}
    with open(os.path.join(state, "jobs", f"{sid}.json"), "w") as f:
        json.dump(job, f)
    for file in files:
        with open(os.path.join(state, f"{file['file_id']}.json"), "w") as f:
            json.dump({**file, "job": sid, "output": output, "status": status, "attempt": 0}, f)


@pytest.mark.own_cluster
def test_grouped_jobs_at_most_once_per_file_across_restarts_wipes_and_retries(cluster, notebook_run, tmp_path):
    data, uploads = tmp_path / "digits", tmp_path / "uploads"
    write_image_folders(str(data), limit=20, broken=False)
    # The image notebook's workspace: data prepared and a model registered as `production` through
    # the same CLI stages (tests/notebook_runner.py), so the watcher does not train one of its own.
    ws = notebook_run("image")["workspace"]
    classes = json.load(open(os.path.join(ws, "image", "prepared", "manifest.json")))["classes"]

    digits = sorted(str(p) for p in data.rglob("*.png"))
    uploads.mkdir()
    for name, source in zip(("a.png", "b.png"), digits, strict=False):
        shutil.copy(source, uploads / name)
    state = os.path.join(ws, "image", "watch", "state")

    def watcher(action: str, *extra: str) -> None:
        settings = ["--workload", "image", "--input", str(uploads), "--interval-s", "1", "--min-age-s", "0"]
        predict = ["--", "--concurrency", "1", "--batch-size", "8"]
        run(cluster, "-m", "ray_app.watcher", action, "--name", "test-watch", "--address", cluster["address"], "--workspace", ws,
            *extra, *(settings + predict if action == "start" else []))  # fmt: skip

    # Two files uploaded together -> ONE job; each file's record names the job and its output, and
    # the file's prediction is found there by its path.
    watcher("start")
    first = wait_for(lambda: finished(state, 2), "the two files' job")
    jobs = watch_jobs(cluster)
    assert len(jobs) == 1 and {j.status.value for j in jobs.values()} == {"SUCCEEDED"}
    (first_job,) = jobs
    assert {r["job"] for r in first.values()} == {first_job} and {r["status"] for r in first.values()} == {"SUCCEEDED"}
    (output,) = {r["output"] for r in first.values()}
    rows = {r["path"]: r for r in pq.read_table(os.path.join(output, "status=ok")).to_pylist()}
    assert set(rows) == {r["file"] for r in first.values()} and {r["label"] for r in rows.values()} <= set(classes)
    assert {os.path.basename(r["file"]) for r in first.values()} == {"a.png", "b.png"}

    # Kill the watcher, start a new one, upload a third file: one new job, nothing re-run.
    watcher("stop")
    watcher("start")
    shutil.copy(digits[2], uploads / "c.png")
    after = wait_for(lambda: finished(state, 3), "the third job")
    jobs_after = watch_jobs(cluster)
    assert len(jobs_after) == 2 and {j.status.value for j in jobs_after.values()} == {"SUCCEEDED"}
    assert jobs_after[first_job].start_time == jobs[first_job].start_time
    (c_sid,) = set(after) - set(first)
    assert os.path.basename(after[c_sid]["file"]) == "c.png"
    watcher("stop")

    # The whole cluster wiped (Ray forgets every job), with what kills leave behind:
    # - a.png's file record lost: rebuilt from its job's record, not run again;
    # - c.png's job finished, but the pass that saw it died before writing SUCCEEDED (RUNNING):
    #   its published output summary proves it ran, so it is NOT run again;
    # - d.png recorded SUBMITTING, never sent: submitted now, once;
    # - e.png's job was running when the cluster went and left no output: LOST, until retried.
    lost = sorted(first)[0]
    os.remove(os.path.join(state, f"{lost}.json"))
    c = after[c_sid]
    _claim(state, c["job"], [{k: c[k] for k in ("file_id", "file", "size", "mtime_ns")}], "RUNNING", c["output"])
    stop_head(cluster["address"])
    start_head(cluster, num_cpus=2)
    claims = {}
    for name, source, status in (("d.png", digits[3], "SUBMITTING"), ("e.png", digits[4], "RUNNING")):
        shutil.copy(source, uploads / name)
        st = os.stat(uploads / name)
        fid = submission_id(state, str(uploads / name), st.st_size, st.st_mtime_ns)
        claims[name] = fid
        file = {"file_id": fid, "file": str(uploads / name), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        _claim(state, fid, [file], status, os.path.join(ws, "image", "watch", "predictions", name))
    watcher("start")
    wait_for(lambda: records(state)[claims["e.png"]]["status"] == "LOST", "the lost job's record")

    # One command runs the lost file again (a new attempt, a new job id), while d.png's job runs.
    watcher("retry", "--file", str(uploads / "e.png"))
    final = wait_for(lambda: finished(state, 5) if records(state)[claims["e.png"]]["status"] == "SUCCEEDED" else None, "the retry")
    e = final[claims["e.png"]]
    assert e["attempt"] == 1 and e["job"] == job_id([claims["e.png"]], 1)
    assert set(watch_jobs(cluster)) == {claims["d.png"], e["job"]}  # nothing else ran on the new cluster
    assert [r["path"] for r in pq.read_table(os.path.join(e["output"], "status=ok")).to_pylist()] == [str(uploads / "e.png")]
    assert final[claims["d.png"]]["status"] == "SUCCEEDED"
    assert final[c_sid]["status"] == "SUCCEEDED" and final[c_sid]["reconciled"] == "output summary"
    assert all(final[s]["status"] == "SUCCEEDED" for s in first) and final[lost]["job"] == first_job
    watcher("stop")
