"""Run batch predict when data is uploaded: a Ray actor polls an input URI and, for every new file,
submits one Ray job ``python -m ray_app <workload> predict --input <file> --output <per-file folder>``.

Exactly once per file, across restarts of the watcher or of the whole cluster:

- each file gets a deterministic submission id, a hash of the watch (its state URI), the file's
  URI, size and modification time; Ray refuses a second job with the same id, so two watchers
  racing on one cluster, or a watcher that lost its records, cannot start the same work twice;
- each file gets a durable record ``<state>/<submission id>.json``, written before the submission
  (``SUBMITTING``) and after it (the job's status, refreshed until it is final), on any
  URI ``pyarrow.fs`` reads — so a watcher on a new cluster, where Ray has forgotten every job,
  still skips what was submitted.

It runs on a cluster (``ray start`` on this machine, or ``--address`` / ``RAY_ADDRESS``), so the
watcher and its jobs outlive the command that started it.

A file is new data when its size or mtime changes (a re-upload runs again). It is picked up once
it has not changed for ``min_age_s`` (a file still being written is left for the next poll).
Names starting with ``.`` or ``_`` are ignored (temporary/partial uploads). A job the cluster no
longer knows (lost in a cluster restart while it ran) is recorded as ``LOST`` and not re-run:
delete its record to run the file again.

    python -m ray_app.watcher start --workload image --input s3://bucket/uploads --workspace s3://bucket/ws
    python -m ray_app.watcher status         # records, last poll, last error
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
LOST = "LOST"  # the cluster no longer knows the job (restarted while it ran): never re-run by itself
FINAL = {"SUCCEEDED", "FAILED", "STOPPED", LOST}


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
    """Deterministic job id for one version of one file in one watch."""
    digest = hashlib.sha256("\0".join([storage.normalize(state_uri), uri, str(size), str(mtime_ns)]).encode()).hexdigest()
    return f"ray-app-watch-{digest[:24]}"


def output_name(input_uri: str, uri: str, sid: str) -> str:
    """Per-file output folder name: the file's path under the input, readable, plus the id's hash."""
    relative = uri[len(input_uri) :].lstrip("/") or uri.rsplit("/", 1)[-1]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', relative.replace('/', '__'))}-{sid.rsplit('-', 1)[-1][:10]}"


def is_candidate(info: pafs.FileInfo, pattern: str, min_age_s: float, now_ns: int) -> bool:
    """An uploaded file ready to process: matches, not hidden/temporary, unchanged for min_age_s."""
    name = info.base_name
    if name.startswith((".", "_")) or not fnmatch.fnmatch(name, pattern):
        return False
    mtime_ns = info.mtime_ns or 0
    return now_ns - mtime_ns >= min_age_s * 1e9


def _not_found(exc: Exception) -> bool:
    return "status code 404" in str(exc)  # the SDK's RuntimeError for a job the cluster does not know


def _already_exists(exc: Exception) -> bool:
    return "already exists" in str(exc)


class Watch:
    """One watch: list, decide, submit, record. No Ray actor needed (the actor wraps it)."""

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
    def record_uri(self, sid: str) -> str:
        return storage.join(self.settings.state, f"{sid}.json")

    def records(self) -> dict[str, dict[str, Any]]:
        state = self.settings.state
        if not storage.exists(state):
            return {}
        records = {}
        for info in storage.list_files(state, recursive=False):
            if not info.base_name.endswith(".json"):
                continue
            sid = info.base_name[: -len(".json")]
            try:
                records[sid] = storage.read_json(self.record_uri(sid))
            except (OSError, ValueError):  # torn write: treat as "maybe submitted", checked with Ray
                records[sid] = {"submission_id": sid, "status": SUBMITTING}
        return records

    def _write(self, record: dict[str, Any]) -> None:
        """Replace a record whole: an object PUT is atomic; on local/NFS disks, write then rename."""
        record["updated_at"] = time.time()
        uri = self.record_uri(record["submission_id"])
        if storage.is_remote(uri):
            storage.write_json(uri, record)
            return
        storage.write_json(uri + ".tmp", record)
        fs, path = storage.resolve(uri)
        fs.move(path + ".tmp", path)

    # ---- one pass ------------------------------------------------------------------------
    def entrypoint(self, uri: str, output: str) -> str:
        s = self.settings
        argv = [s.python or sys.executable, "-m", "ray_app", s.workload, "predict", "--workspace", s.workspace]
        if s.models:
            argv += ["--models", s.models]
        argv += ["--input", uri, "--output", output, "--model", s.model, *s.predict_args]
        return shlex.join(argv)

    def poll(self) -> dict[str, Any]:
        """List the input, refresh unfinished records, submit new files; returns what happened."""
        s = self.settings
        records = self.records()
        for record in records.values():
            if record["status"] in FINAL:
                continue
            status = self.job_status(record["submission_id"])
            if status is None and record["status"] != SUBMITTING:
                status = LOST
            if status is not None and status != record["status"]:
                record["status"] = status
                self._write(record)
        # SUBMITTING here means Ray has no such job: the pass that wrote it stopped before submitting.
        running = sum(r["status"] not in FINAL and r["status"] != SUBMITTING for r in records.values())
        now_ns = time.time_ns()
        files = storage.list_files(s.input) if storage.exists(s.input) else []
        submitted, recovered, waiting, known = [], [], [], 0
        for info in files:
            if not is_candidate(info, s.pattern, s.min_age_s, now_ns):
                continue
            uri = file_uri(s.input, info)
            if uri.startswith((s.state + "/", s.output + "/")):
                continue  # the watch's own records and predictions, when they live under the input
            sid = submission_id(s.state, uri, info.size, info.mtime_ns or 0)
            record = records.get(sid)
            if record is not None and record["status"] != SUBMITTING:
                known += 1
                continue
            if running >= s.max_running_jobs:
                waiting.append(uri)
                continue
            record = {
                "submission_id": sid,
                "file": uri,
                "size": info.size,
                "mtime_ns": info.mtime_ns,
                "workload": s.workload,
                "model": s.model,
                "output": storage.join(s.output, output_name(s.input, uri, sid)),
                "status": SUBMITTING,
            }
            self._write(record)  # before: a restart will not lose track of this submission
            created = self._submit(record)
            record["status"] = self.job_status(sid) or SUBMITTING
            record["submitted_at"] = time.time()
            self._write(record)  # after: the cluster's answer
            (submitted if created else recovered).append(record)
            records[sid] = record
            running += 1
        statuses = dict(collections.Counter(r["status"] for r in records.values()))
        if submitted:
            log.info("watch %s: submitted %s", s.input, [r["submission_id"] for r in submitted])
        # recovered: the record was missing but Ray already had the job (same submission id).
        return {"submitted": submitted, "recovered": recovered, "already_known": known, "waiting": waiting, "statuses": statuses}

    def _submit(self, record: dict[str, Any]) -> bool:
        """Submit the file's job; False when Ray already has a job with this submission id."""
        sid = record["submission_id"]
        metadata = {"ray_app": "watch", "workload": self.settings.workload, "file": record["file"], "size": str(record["size"])}
        try:
            self.client().submit_job(
                entrypoint=self.entrypoint(record["file"], record["output"]),
                submission_id=sid,
                runtime_env=self.settings.runtime_env,
                metadata=metadata,
            )
        except RuntimeError as exc:
            if not _already_exists(exc):
                raise  # the record stays SUBMITTING: the next pass asks Ray again, then retries
            log.info("job %s already exists on the cluster; not submitted again", sid)
            return False
        return True


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
    parser.add_argument("action", choices=["start", "poll", "status", "stop"], help="start the actor / poll once / show records / stop")
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
        else:
            watcher = start_watcher(settings, args.name, args.detached)
            result = ray.get(watcher.status.remote())
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
