"""Run batch predict when data is uploaded: a Ray actor polls an input URI and submits Ray jobs
``python -m ray_app <workload> predict --input-list <files> --output <job folder>`` for new files.

Grouping: the new files of one poll go into ONE predict job (up to ``max_files_per_job``), so a
200-image upload pays Ray Data's job start-up once, not 200 times. With ``marker`` set (e.g.
``_SUCCESS``), a folder is picked up only once its marker exists, and its files form one job.

At most once per file version, across restarts of the watcher or of the whole cluster:

- a file version (URI, size, mtime) has a deterministic id; a job's submission id is a hash of its
  files' ids and the attempt number, so Ray refuses a second job for the same work;
- durable records on any URI ``pyarrow.fs`` reads: ``<state>/jobs/<job id>.json`` (the job's
  files, output, status) is written before the submission (``SUBMITTING``), then one record per
  file ``<state>/<file id>.json`` naming its job, output and status (how results are found per
  file: the job's Parquet rows carry each file's path);
- before a job the cluster does not know is submitted again or called ``LOST``, its output is
  checked: a published ``summary.json`` for that job's input list means it finished (e.g. before
  a cluster wipe), and it is recorded ``SUCCEEDED`` without running again.

A failed, stopped or lost file runs again only when asked, up to ``max_retries`` times:
``python -m ray_app.watcher retry --file <uri>`` (or ``--failed`` for all of them).

It runs on a cluster (``ray start`` on this machine, or ``--address`` / ``RAY_ADDRESS``), so the
watcher and its jobs outlive the command that started it.

A file is new data when its size or mtime changes (a re-upload runs again). It is picked up once
it has not changed for ``min_age_s`` (a file still being written is left for the next poll).
Names starting with ``.`` or ``_`` are ignored (temporary/partial uploads, markers).

    python -m ray_app.watcher start --workload image --input s3://bucket/uploads --workspace s3://bucket/ws
    python -m ray_app.watcher status         # records, last poll, last error
    python -m ray_app.watcher retry --file s3://bucket/uploads/a.png   # or --failed
    python -m ray_app.watcher stop           # records stay: a new watcher carries on from them
    # extra predict flags after --, e.g.:  ... start ... -- --concurrency 1 --batch-size 64
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import shlex
import sys
import threading
import time
from typing import Any

import pyarrow.fs as pafs
import ray
from pydantic import BaseModel, ConfigDict, Field

from ray_app import storage

log = logging.getLogger(__name__)

NAMESPACE = "ray_app"
DEFAULT_NAME = "ray-app-watcher"
SUBMITTING = "SUBMITTING"  # record written, job not (yet) known to be submitted
LOST = "LOST"  # the cluster no longer knows the job and it left no output: re-run only by `retry`
SUCCEEDED = "SUCCEEDED"
FINAL = {SUCCEEDED, "FAILED", "STOPPED", LOST}
RETRYABLE = {"FAILED", "STOPPED", LOST}
JOBS_DIR = "jobs"


class WatchSettings(BaseModel):
    """What to watch, where to keep state and predictions, and how to run predict."""

    model_config = ConfigDict(extra="forbid")

    workload: str
    input: str = Field(description="URI polled for uploaded files (a folder, searched recursively)")
    workspace: str = Field("./workspace", description="workspace of the predict jobs (model registry under it)")
    models: str | None = Field(None, description="model registry URI (default: <workspace>/models)")
    model: str = Field("production", description="registry alias or version used by every job")
    state: str | None = Field(None, description="per-file records (default: <workspace>/<workload>/watch/state)")
    output: str | None = Field(None, description="per-file predictions (default: <workspace>/<workload>/watch/predictions)")
    pattern: str = Field("*", description="file-name glob, e.g. '*.png'")
    predict_args: list[str] = Field(default_factory=list, description="extra flags for predict, e.g. ['--concurrency', '1']")
    interval_s: float = Field(10.0, ge=0, description="seconds between polls; 0 = poll only when asked")
    min_age_s: float = Field(5.0, ge=0, description="a file must be unchanged this long before it is picked up")
    max_running_jobs: int = Field(2, gt=0, description="unfinished jobs at once; further files wait for the next poll")
    max_files_per_job: int = Field(1000, gt=0, description="new files of a poll grouped into one predict job (1: a job per file)")
    marker: str | None = Field(None, description="e.g. _SUCCESS: a folder is processed once this file is in it, its files as one job")
    max_retries: int = Field(3, ge=0, description="times `retry` may re-run a failed or lost file")
    python: str | None = Field(None, description="interpreter in the job entrypoint (default: the watcher's own)")
    runtime_env: dict[str, Any] | None = Field(None, description="runtime_env of every job (e.g. working_dir)")
    dashboard_address: str | None = Field(None, description="Jobs API address (default: the cluster the watcher runs in)")

    def resolved(self) -> WatchSettings:
        """Absolute URIs and defaults filled in, so the actor does not depend on the caller's cwd."""
        workspace = storage.normalize(self.workspace)
        watch_root = storage.join(workspace, self.workload, "watch")
        return self.model_copy(
            update={
                "input": storage.normalize(self.input),
                "workspace": workspace,
                "models": storage.normalize(self.models) if self.models else None,
                "state": storage.normalize(self.state or storage.join(watch_root, "state")),
                "output": storage.normalize(self.output or storage.join(watch_root, "predictions")),
            }
        )


def file_uri(input_uri: str, info: pafs.FileInfo) -> str:
    """A listed file's URI in the same form as the input (``s3://bucket/key`` or a local path)."""
    if storage.is_remote(input_uri):
        return f"{input_uri.split('://', 1)[0]}://{info.path}"
    return info.path


def submission_id(state_uri: str, uri: str, size: int, mtime_ns: int) -> str:
    """Deterministic id of one version of one file in one watch (also the submission id of its job
    when it runs alone, as every file did before jobs were grouped)."""
    digest = hashlib.sha256("\0".join([storage.normalize(state_uri), uri, str(size), str(mtime_ns)]).encode()).hexdigest()
    return f"ray-app-watch-{digest[:24]}"


def job_id(file_ids: list[str], attempt: int = 0) -> str:
    """Deterministic submission id of the job for these file versions (any order) and attempt."""
    if len(file_ids) == 1 and attempt == 0:
        return file_ids[0]
    digest = hashlib.sha256("\0".join([*sorted(file_ids), f"attempt={attempt}"]).encode()).hexdigest()
    return f"ray-app-watch-{digest[:24]}"


def output_name(input_uri: str, uri: str, sid: str) -> str:
    """Per-file output folder name: the file's path under the input, readable, plus the id's hash."""
    relative = uri[len(input_uri) :].lstrip("/") or uri.rsplit("/", 1)[-1]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', relative.replace('/', '__'))}-{sid.rsplit('-', 1)[-1][:10]}"


def job_output_name(input_uri: str, uris: list[str], sid: str) -> str:
    """A job's output folder: named after its file when alone, else after the first file and count."""
    if len(uris) == 1:
        return output_name(input_uri, uris[0], sid)
    return f"{len(uris)}-files-from-" + output_name(input_uri, sorted(uris)[0], sid)


def is_candidate(info: pafs.FileInfo, pattern: str, min_age_s: float, now_ns: int) -> bool:
    """An uploaded file ready to process: matches, not hidden/temporary, unchanged for min_age_s."""
    name = info.base_name
    if name.startswith((".", "_")) or not fnmatch.fnmatch(name, pattern):
        return False
    mtime_ns = info.mtime_ns or 0
    return now_ns - mtime_ns >= min_age_s * 1e9


def group_files(files: list[dict[str, Any]], max_files: int, marker_folders: set[str] | None = None) -> list[list[dict[str, Any]]]:
    """New files -> job groups: chunks of at most ``max_files``; with a marker, one group per
    finished folder (files of folders without their marker yet are left out)."""
    if marker_folders is None:
        return [files[i : i + max_files] for i in range(0, len(files), max_files)]
    by_folder: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for f in files:
        folder = posixpath.dirname(f["file"])
        if folder in marker_folders:
            by_folder[folder].append(f)
    return [group[i : i + max_files] for _, group in sorted(by_folder.items()) for i in range(0, len(group), max_files)]


def _not_found(exc: Exception) -> bool:
    return "status code 404" in str(exc)  # the SDK's RuntimeError for a job the cluster does not know


def _already_exists(exc: Exception) -> bool:
    return "already exists" in str(exc)


class RetryRefused(ValueError):
    """A retry that would break a rule (unknown file, not failed, retry limit reached)."""


class Watch:
    """One watch: list, group, reconcile, submit, record. No Ray actor needed (the actor wraps it)."""

    def __init__(self, settings: WatchSettings) -> None:
        self.settings = settings.resolved()
        self._client = None

    # ---- Jobs API ------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            address = self.settings.dashboard_address
            if address is None and ray.is_initialized():
                address = ray.get_runtime_context().gcs_address  # the dashboard is looked up through GCS
            self._client = JobSubmissionClient(address)
        return self._client

    def job_status(self, sid: str) -> str | None:
        """The job's status, or None when the cluster does not know it."""
        try:
            return str(self.client().get_job_status(sid).value)
        except RuntimeError as exc:
            if _not_found(exc):
                return None
            raise

    # ---- durable state -------------------------------------------------------------------
    def record_uri(self, file_id: str) -> str:
        return storage.join(self.settings.state, f"{file_id}.json")

    def job_uri(self, sid: str, suffix: str = ".json") -> str:
        return storage.join(self.settings.state, JOBS_DIR, f"{sid}{suffix}")

    def _read_folder(self, folder: str) -> dict[str, dict[str, Any]]:
        if not storage.exists(folder):
            return {}
        found = {}
        for info in storage.list_files(folder, recursive=False):
            if not info.base_name.endswith(".json"):
                continue
            key = info.base_name[: -len(".json")]
            try:
                found[key] = storage.read_json(storage.join(folder, info.base_name))
            except (OSError, ValueError):  # torn write: treated as "maybe submitted", checked with Ray
                found[key] = {"status": SUBMITTING, "damaged": True}
        return found

    def records(self) -> dict[str, dict[str, Any]]:
        """Per-file records by file id. Records written before jobs were grouped (one job per file,
        the job id was the file id) read as jobs of one file."""
        records = self._read_folder(self.settings.state)
        for key, record in records.items():
            record.setdefault("file_id", key)
            record.setdefault("job", record.get("submission_id", key))
        return records

    def jobs(self, records: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Job records by submission id. Given the file records, a job whose own record is missing
        (written before jobs had records, or lost) is rebuilt from the files that name it."""
        jobs = self._read_folder(storage.join(self.settings.state, JOBS_DIR))
        for key, job in jobs.items():
            job.setdefault("submission_id", key)
        for record in (records or {}).values():
            if record.get("damaged") or "file" not in record or record["job"] in jobs and "files" in jobs[record["job"]]:
                continue
            job = jobs.setdefault(
                record["job"],
                {"submission_id": record["job"], "files": [], "output": record.get("output"), "status": record["status"]},
            )
            job.setdefault("files", []).append({k: record.get(k) for k in ("file_id", "file", "size", "mtime_ns")})
            job.setdefault("attempt", record.get("attempt", 0))
        return jobs

    def _write(self, uri: str, record: dict[str, Any]) -> None:
        """Replace a record whole: an object PUT is atomic; on local/NFS disks, write then rename."""
        record["updated_at"] = time.time()
        if storage.is_remote(uri):
            storage.write_json(uri, record)
            return
        storage.write_json(uri + ".tmp", record)
        fs, path = storage.resolve(uri)
        fs.move(path + ".tmp", path)

    def _write_record(self, record: dict[str, Any]) -> None:
        self._write(self.record_uri(record["file_id"]), record)

    def _write_job(self, job: dict[str, Any]) -> None:
        self._write(self.job_uri(job["submission_id"]), job)

    # ---- jobs ----------------------------------------------------------------------------
    def entrypoint(self, job: dict[str, Any]) -> str:
        s = self.settings
        argv = [s.python or sys.executable, "-m", "ray_app", s.workload, "predict", "--workspace", s.workspace]
        if s.models:
            argv += ["--models", s.models]
        if len(job["files"]) > 1 and not job.get("input_list"):  # a job rebuilt from its files' records
            job["input_list"] = self.job_uri(job["submission_id"], ".inputs.txt")
            if not storage.exists(job["input_list"]):
                storage.write_bytes(job["input_list"], ("\n".join(f["file"] for f in job["files"]) + "\n").encode())
        source = ["--input-list", job["input_list"]] if job.get("input_list") else ["--input", job["files"][0]["file"]]
        argv += [*source, "--output", job["output"], "--model", s.model, *s.predict_args]
        return shlex.join(argv)

    def _start_job(self, files: list[dict[str, Any]], attempt: int) -> tuple[dict[str, Any], bool]:
        """Record, then submit, one job for ``files``; returns (job record, created)."""
        s = self.settings
        sid = job_id([f["file_id"] for f in files], attempt)
        uris = [f["file"] for f in files]
        job = {
            "submission_id": sid,
            "files": [{k: f[k] for k in ("file_id", "file", "size", "mtime_ns")} for f in files],
            "output": storage.join(s.output, job_output_name(s.input, uris, sid)),
            "attempt": attempt,
            "status": SUBMITTING,
            "created_at": time.time(),
        }
        if len(files) > 1:
            job["input_list"] = self.job_uri(sid, ".inputs.txt")
            storage.write_bytes(job["input_list"], ("\n".join(uris) + "\n").encode())
        # Order matters: the job record (which files, which output) is durable before any file is
        # claimed by it, and both before the submission, so a pass killed anywhere in between is
        # finished by the next one (see _refresh) instead of starting the work twice.
        self._write_job(job)
        for f in job["files"]:
            self._write_record(self._file_record(f, job))
        created = self._submit(job)
        self._set_status(job, self.job_status(sid) or SUBMITTING, {f["file_id"] for f in job["files"]})
        job["submitted_at"] = time.time()
        return job, created

    def _file_record(self, f: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        return {
            **f,
            "workload": s.workload,
            "model": s.model,
            "job": job["submission_id"],
            "output": job["output"],
            "attempt": job["attempt"],
            "status": job["status"],
        }

    def _set_status(self, job: dict[str, Any], status: str, file_ids: set[str], **extra: Any) -> None:
        job.update(status=status, **extra)
        self._write_job(job)
        for f in job["files"]:
            if f["file_id"] in file_ids:
                self._write_record(self._file_record(f, job) | extra)

    def _submit(self, job: dict[str, Any]) -> bool:
        """Submit the job; False when Ray already has a job with this submission id."""
        sid = job["submission_id"]
        metadata = {"ray_app": "watch", "workload": self.settings.workload, "files": str(len(job["files"])), "attempt": str(job["attempt"])}
        try:
            self.client().submit_job(
                entrypoint=self.entrypoint(job), submission_id=sid, runtime_env=self.settings.runtime_env, metadata=metadata
            )
        except RuntimeError as exc:
            if not _already_exists(exc):
                raise  # the job stays SUBMITTING: the next pass asks Ray again, then retries
            log.info("job %s already exists on the cluster; not submitted again", sid)
            return False
        return True

    def finished_output(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The published summary of this job's output, when the job completed (e.g. on a cluster
        that has since been wiped): the proof that its files must not run again."""
        from ray_app.prepared import SUMMARY_FILE

        if not job.get("output"):
            return None
        summary_uri = storage.join(storage.published(job["output"]), SUMMARY_FILE)
        if not storage.exists(summary_uri):
            return None
        summary = storage.read_json(summary_uri)
        expected = job.get("input_list") or job["files"][0]["file"]
        return summary if summary.get("input") == expected else None

    # ---- one pass ------------------------------------------------------------------------
    def _refresh(self, jobs: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]) -> list[str]:
        """Bring unfinished jobs up to date with Ray, or with their output when Ray has forgotten
        them; submit the ones a killed pass recorded but never sent. Returns their ids."""
        resubmitted = []
        for sid, job in jobs.items():
            if job.get("damaged") and not job.get("files"):
                log.warning("job record %s is unreadable; its files stay claimed", self.job_uri(sid))
                continue
            # Files a killed pass had not yet claimed for this job, or whose record was lost.
            claimed_here = {f["file_id"] for f in job["files"] if records.get(f["file_id"], {}).get("job", sid) == sid}
            for f in job["files"]:
                if f["file_id"] not in records or records[f["file_id"]].get("damaged"):
                    records[f["file_id"]] = self._file_record(f, job)
                    self._write_record(records[f["file_id"]])
            if job["status"] in FINAL:
                continue
            status = self.job_status(sid)
            extra: dict[str, Any] = {}
            if status is None:
                if self.finished_output(job) is not None:
                    status, extra = SUCCEEDED, {"reconciled": "output summary"}
                elif job["status"] == SUBMITTING:
                    self._submit(job)  # the pass that recorded it stopped before submitting
                    status = self.job_status(sid) or SUBMITTING
                    resubmitted.append(sid)
                else:
                    status = LOST
            if status != job["status"] or extra:
                self._set_status(job, status, claimed_here, **extra)
                for fid in claimed_here:
                    records[fid] = {**records.get(fid, {}), "status": status, "job": sid}
        return resubmitted

    def poll(self) -> dict[str, Any]:
        """List the input, reconcile unfinished jobs, group and submit new files; returns what happened."""
        s = self.settings
        records = self.records()
        jobs = self.jobs(records)
        resubmitted = self._refresh(jobs, records)
        running = sum(j["status"] not in FINAL for j in jobs.values() if j.get("files"))
        claimed = set(records) | {f["file_id"] for j in jobs.values() for f in j.get("files", [])}

        now_ns = time.time_ns()
        infos = storage.list_files(s.input) if storage.exists(s.input) else []
        new, known, markers = [], 0, set()
        for info in infos:
            uri = file_uri(s.input, info)
            if uri.startswith((s.state + "/", s.output + "/")):
                continue  # the watch's own records and predictions, when they live under the input
            if s.marker and info.base_name == s.marker:
                markers.add(posixpath.dirname(uri))
            if not is_candidate(info, s.pattern, s.min_age_s, now_ns):
                continue
            fid = submission_id(s.state, uri, info.size, info.mtime_ns or 0)
            if fid in claimed:
                known += 1
                continue
            new.append({"file_id": fid, "file": uri, "size": info.size, "mtime_ns": info.mtime_ns})

        submitted, recovered, waiting = [], [], []
        for group in group_files(new, s.max_files_per_job, markers if s.marker else None):
            if running >= s.max_running_jobs:
                waiting += [f["file"] for f in group]
                continue
            job, created = self._start_job(group, attempt=0)
            jobs[job["submission_id"]] = job
            (submitted if created else recovered).append(job)
            running += 1
        if submitted:
            log.info("watch %s: submitted %s", s.input, [(j["submission_id"], len(j["files"])) for j in submitted])
        statuses = dict(collections.Counter(r["status"] for r in self.records().values()))
        # recovered: the records were missing but Ray already had the job (same submission id).
        return {
            "submitted": submitted,
            "recovered": recovered,
            "resubmitted": resubmitted,
            "already_known": known,
            "waiting": waiting,
            "statuses": statuses,
        }

    def retry(self, files: list[str] | None = None, failed: bool = False) -> dict[str, Any]:
        """Run failed, stopped or lost files again (named ``files``, or all of them with ``failed``),
        each at most ``max_retries`` times; other files are refused with the reason."""
        s = self.settings
        records = self.records()
        by_file: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for record in records.values():
            by_file[storage.normalize(record["file"]) if "://" not in record["file"] else record["file"]].append(record)
        if failed:
            wanted = [r for r in records.values() if r["status"] in RETRYABLE]
        else:
            wanted = []
            for uri in files or []:
                key = storage.normalize(uri) if "://" not in uri else uri
                if key not in by_file:
                    raise RetryRefused(f"no record for {uri}: the watcher has not seen this file")
                wanted.append(max(by_file[key], key=lambda r: r.get("updated_at", 0)))  # its newest version
        refused = {}
        for record in wanted:
            if record["status"] not in RETRYABLE:
                refused[record["file"]] = f"its job {record['job']} is {record['status']}; only {sorted(RETRYABLE)} files are retried"
            elif record.get("attempt", 0) >= s.max_retries:
                refused[record["file"]] = f"already retried {record.get('attempt', 0)} times (max_retries={s.max_retries})"
        if refused:
            raise RetryRefused("; ".join(f"{f}: {why}" for f, why in refused.items()))
        started = []
        by_attempt: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        for record in wanted:
            by_attempt[record.get("attempt", 0) + 1].append(record)
        for attempt, group in sorted(by_attempt.items()):
            for chunk in group_files(group, s.max_files_per_job):
                job, _ = self._start_job(chunk, attempt)
                started.append(job)
        return {"retried": started}


@ray.remote(num_cpus=0, max_restarts=-1)
class UploadWatcher:
    """A Watch polled every ``interval_s`` in a background thread; Ray restarts the actor if its
    process dies, and a restarted (or re-created) watcher reads its state back from storage."""

    def __init__(self, settings: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.watch = Watch(WatchSettings.model_validate(settings))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None
        if self.watch.settings.interval_s > 0:
            threading.Thread(target=self._loop, name="upload-watcher", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep watching; the error is reported by status()
                self.last_error = repr(exc)
                log.exception("watch poll failed")
            self._stop.wait(self.watch.settings.interval_s)

    def poll(self) -> dict[str, Any]:
        with self._lock:
            self.last = self.watch.poll()
            return self.last

    def status(self) -> dict[str, Any]:
        with self._lock:
            records = self.watch.records()
        return {"settings": self.watch.settings.model_dump(), "records": records, "last_poll": self.last, "last_error": self.last_error}

    def retry(self, files: list[str] | None = None, failed: bool = False) -> dict[str, Any]:
        with self._lock:  # never interleaved with a poll of this watcher
            return self.watch.retry(files, failed)

    def stop(self) -> None:
        self._stop.set()


def start_watcher(settings: WatchSettings | dict[str, Any], name: str = DEFAULT_NAME, detached: bool = True):
    """Create the named watcher actor (or return the running one of that name). Needs ray.init()."""
    settings = WatchSettings.model_validate(settings).resolved()
    return UploadWatcher.options(name=name, namespace=NAMESPACE, lifetime="detached" if detached else None, get_if_exists=True).remote(
        settings.model_dump()
    )


def get_watcher(name: str = DEFAULT_NAME):
    return ray.get_actor(name, namespace=NAMESPACE)


def stop_watcher(name: str = DEFAULT_NAME) -> bool:
    """Kill the named watcher (its records stay; a new watcher carries on from them)."""
    try:
        actor = get_watcher(name)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is free once the kill went through
        try:
            get_watcher(name)
        except ValueError:
            break
        time.sleep(0.2)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_app.watcher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "action",
        choices=["start", "poll", "status", "retry", "stop"],
        help="start the actor / poll once / show records / re-run failed or lost files / stop",
    )
    parser.add_argument("--file", dest="files", action="append", default=[], help="retry: a file to run again (repeatable)")
    parser.add_argument("--failed", action="store_true", help="retry: every failed, stopped or lost file")
    parser.add_argument("--name", default=DEFAULT_NAME, help="actor name (one watcher per name)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else the cluster on this machine)")
    parser.add_argument("--no-detach", dest="detached", action="store_false", help="actor dies with this process")
    parser.add_argument("--log-level", default="INFO")
    for name, field in WatchSettings.model_fields.items():
        if name in ("predict_args", "runtime_env"):
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": field.description or ""}
        if field.annotation in (float, int):
            kwargs["type"] = field.annotation
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    parser.add_argument("--runtime-env-json", default=None, help="runtime_env of every job, as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    predict_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ray_app.runtime import connect

    connect(args.address or os.environ.get("RAY_ADDRESS") or "auto")  # never a throwaway local instance
    if args.action == "stop":
        result: dict[str, Any] = {"stopped": stop_watcher(args.name)}
    elif args.action == "status":
        result = ray.get(get_watcher(args.name).status.remote())
    elif args.action == "retry" and not (args.workload and args.input):
        if not args.files and not args.failed:
            raise SystemExit("retry needs --file URI (repeatable) or --failed")
        try:  # through the running watcher, so the retry never races one of its polls
            result = ray.get(get_watcher(args.name).retry.remote(args.files, args.failed))
        except ValueError as exc:  # RetryRefused (raised in the actor), or no watcher of that name
            raise SystemExit(f"retry refused: {getattr(exc, 'cause', None) or exc}") from None
    else:
        values = {k: v for k, v in vars(args).items() if k in WatchSettings.model_fields and v is not None}
        if not values.get("workload") or not values.get("input"):
            raise SystemExit(f"{args.action} needs --workload and --input")
        values["predict_args"] = predict_args
        if args.runtime_env_json:
            values["runtime_env"] = json.loads(args.runtime_env_json)
        settings = WatchSettings.model_validate(values)
        if args.action == "poll":  # one pass from this process, e.g. from cron or a CI step
            result = Watch(settings).poll()
        elif args.action == "retry":  # with --workload/--input: from this process, no watcher needed
            try:
                result = Watch(settings).retry(args.files, args.failed)
            except RetryRefused as exc:
                raise SystemExit(f"retry refused: {exc}") from None
        else:
            watcher = start_watcher(settings, args.name, args.detached)
            result = ray.get(watcher.status.remote())
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
