"""MLflow tracking for the stages: one experiment per workload, one MLflow run per training run.

Train opens the run and records its id in the run folder (``mlflow_run.json``); evaluate,
register and tune add to the run found there. Everything is logged from the driver after a stage
has written its own files, so a tracking failure (a server down, a locked database) costs a warning
line and a ``tracking`` summary field, never the run's files. MLflow is imported lazily, only here:
nothing on the serving path imports it (``import mlflow`` takes ~1.5 s).

Where runs go: ``--tracking-uri`` / ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite
database beside a local workspace (``sqlite:///<workspace>/mlflow.db``, artifacts in
``<workspace>/mlartifacts``). SQLite cannot live on ``s3://``: a remote workspace needs a tracking
server (``mlflow server`` on the head node), otherwise tracking is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from ray_app import storage
from ray_app.config import AppConfig

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
# MLflow caps a param value at 6000 characters and a batch at 100 params.
MAX_PARAM_CHARS = 500
PARAMS_PER_BATCH = 100


def tracking_uri(config: AppConfig) -> str | None:
    """The tracking URI, or None when there is nowhere to log (a remote workspace and no server)."""
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_remote(config.workspace):
        return None
    return f"sqlite:///{os.path.abspath(storage.normalize(config.workspace))}/mlflow.db"


def experiment_name(config: AppConfig) -> str:
    return config.tracking.experiment or f"ray_app-{config.workload}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.lr": 0.003, ...}`` (lists stay one value)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def numeric_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def recorded_run(run_uri: str) -> dict[str, Any] | None:
    """The MLflow run a training run folder records (no MLflow import: the registry reads it too)."""
    uri = storage.join(run_uri, RUN_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


class Tracker:
    """One stage's MLflow session. Every call is guarded: the first failure is logged as a warning
    and recorded in ``summary()``; later calls are skipped, so a dead server costs one timeout."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.uri = tracking_uri(config) if config.tracking.enabled else None
        self.warnings: list[str] = []
        self.run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        if not config.tracking.enabled:
            self.warnings.append("tracking disabled (tracking.enabled=false)")
        elif self.uri is None:
            self._warn(
                f"no MLflow tracking for the remote workspace {config.workspace}: SQLite cannot live on object storage; "
                "run `mlflow server` on the head node and pass --tracking-uri http://<head>:5000 (or set MLFLOW_TRACKING_URI)"
            )

    @property
    def active(self) -> bool:
        return self.uri is not None and not any(w.startswith("tracking failed") for w in self.warnings)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("mlflow: %s", message)

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.active:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a stage whose files are written
            self._warn(f"tracking failed at {what} ({type(exc).__name__}: {str(exc)[:300]}); the run's own files are unaffected")
            return None

    def client(self) -> Any:
        if self._client is None:
            if self.uri.startswith(("http://", "https://")):
                # Fail in seconds, not after MLflow's minutes of retries with backoff.
                with urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=5) as response:
                    response.read()
            elif self.uri.startswith("sqlite:///"):
                os.makedirs(os.path.dirname(self.uri.removeprefix("sqlite:///")), exist_ok=True)
            from mlflow import MlflowClient

            # A stage prints its progress lines only (ray_app.progress): MLflow's own INFO lines
            # (e.g. creating the SQLite tables) and Alembic's migrations stay off the console.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = experiment_name(self.config)
            found = self.client().get_experiment_by_name(name)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                location = None
                if self.uri.startswith("sqlite:///"):  # beside the database, not ./mlruns of whatever the cwd is
                    location = "file://" + os.path.join(os.path.dirname(self.uri.removeprefix("sqlite:///")), "mlartifacts")
                self._experiment_id = self.client().create_experiment(name, artifact_location=location)
        return self._experiment_id

    # Runs -----------------------------------------------------------------------------------

    def open_run(self, run_name: str, run_uri: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str | None:
        """The MLflow run of a training run folder: the one it records (a resumed run keeps its
        MLflow run), else a new one, recorded in the folder."""
        recorded = recorded_run(run_uri)
        if recorded and recorded.get("tracking_uri") == self.uri:
            self.run_id = recorded["run_id"]
            return self.run_id

        def create() -> str:
            all_tags = {"ray_app.workload": self.config.workload, "ray_app.run_uri": run_uri, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client().create_run(self.experiment_id(), run_name=run_name, tags=all_tags)
            return run.info.run_id

        self.run_id = self.call("create run", create)
        if self.run_id:
            storage.write_json(
                storage.join(run_uri, RUN_FILE),
                {"tracking_uri": self.uri, "experiment_id": self._experiment_id, "run_id": self.run_id, "run_name": run_name},
            )
        return self.run_id

    def attach(self, run_uri: str) -> str | None:
        """Add to the MLflow run that ``run_uri``'s training recorded (evaluate, register)."""
        if not self.active:
            return None
        recorded = recorded_run(run_uri)
        if recorded is None:
            self.warnings.append(f"no MLflow run recorded in {run_uri} (trained without tracking): nothing added")
            return None
        if recorded.get("tracking_uri") != self.uri:
            self._warn(f"the run was tracked at {recorded.get('tracking_uri')}, not {self.uri}: nothing added")
            return None
        self.run_id = recorded["run_id"]
        return self.run_id

    def finish_run(self, status: str = "FINISHED", run_id: str | None = None) -> None:
        target = run_id or self.run_id
        if target:
            self.call("end run", lambda: self.client().set_terminated(target, status=status))

    # Logging --------------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any], run_id: str | None = None) -> None:
        target = run_id or self.run_id
        if not target:
            return

        def log_all() -> None:
            from mlflow.entities import Param

            existing = self.client().get_run(target).data.params  # a resumed run: params are write-once
            items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in existing]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client().log_batch(target, params=items[start : start + PARAMS_PER_BATCH])

        self.call("log params", log_all)

    def log_metrics(self, rows: Iterable[tuple[int, dict[str, float]]], run_id: str | None = None, only_new_steps: bool = False) -> None:
        """``(step, {name: value})`` rows, e.g. one per epoch. ``only_new_steps``: a resumed run or
        a re-run sweep logs its whole history again; keep only the steps MLflow does not have."""
        target = run_id or self.run_id
        if not target:
            return

        def log_all() -> None:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            pending = list(rows)
            if only_new_steps and pending and pending[0][1]:
                probe = next(iter(pending[0][1]))
                logged = {m.step for m in self.client().get_metric_history(target, probe)}
                pending = [(step, values) for step, values in pending if step not in logged]
            metrics = [Metric(k, v, now, step) for step, values in pending for k, v in values.items()]
            for start in range(0, len(metrics), 1000):
                self.client().log_batch(target, metrics=metrics[start : start + 1000])

        self.call("log metrics", log_all)

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        target = run_id or self.run_id
        if target:
            self.call("set tags", lambda: [self.client().set_tag(target, k, str(v)) for k, v in tags.items()])

    def log_files(self, folder_uri: str, names: Iterable[str], artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Copy files of a (local or remote) folder into the run's artifacts."""
        target = run_id or self.run_id
        if not target:
            return

        def log_all() -> None:
            with tempfile.TemporaryDirectory() as folder:
                for name in names:
                    uri = storage.join(folder_uri, name)
                    if not storage.exists(uri):
                        continue
                    local = os.path.join(folder, name)
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                    self.client().log_artifact(target, local, artifact_path)

        self.call("log artifacts", log_all)

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": experiment_name(self.config), "run_id": self.run_id, "warnings": self.warnings}


# Stage hooks -------------------------------------------------------------------------------

TRAIN_ARTIFACTS = ("curves.png", "history.json", "train_summary.json", "config.train.yaml")


def history_rows(history: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    return [(int(h["epoch"]), numeric_metrics({k: v for k, v in h.items() if k != "epoch"})) for h in history]


def log_training(config: AppConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """After train wrote its files: the resolved config as params, each epoch's metrics, the
    curves, history, summary and config as artifacts."""
    tracker = Tracker(config)
    run_uri = config.run_uri()
    if tracker.active and tracker.open_run(config.train.run_name, run_uri, tags={"ray_app.stage": "train"}):
        tracker.log_params(flatten(config.model_dump(mode="json", exclude={"serve", "predict", "rollback", "tune"})))
        history = storage.read_json(storage.join(run_uri, "history.json"))
        tracker.log_metrics(history_rows(history), only_new_steps=True)
        tracker.set_tags({"ray_app.checkpoint": summary["checkpoint"], "ray_app.epochs_completed": summary["epochs_completed"]})
        tracker.log_files(run_uri, TRAIN_ARTIFACTS)
        tracker.finish_run()
    return tracker.summary()


def log_evaluation(config: AppConfig, report: dict[str, Any], output_uri: str, names: Iterable[str]) -> dict[str, Any]:
    tracker = Tracker(config)
    if tracker.attach(config.run_uri()):
        tracker.log_metrics([(0, numeric_metrics(report, prefix="test_"))])
        tracker.set_tags({"ray_app.evaluated_model": report.get("model", "")})
        tracker.log_files(output_uri, names, artifact_path="evaluation")
    return tracker.summary()


def log_registration(config: AppConfig, version: int, alias: str | None, version_uri: str) -> dict[str, Any]:
    tracker = Tracker(config)
    if tracker.attach(config.run_uri()):
        tracker.set_tags(
            {"ray_app.registered_version": version, "ray_app.registered_alias": alias or "", "ray_app.version_uri": version_uri}
        )
    return tracker.summary()
