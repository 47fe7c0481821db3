"""MLflow tracking: a real SQLite store read back with MlflowClient; a dead server costs a warning,
never the run's files; nothing on the serving path imports mlflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ray_app import storage, tracking
from ray_app.config import load_config
from ray_app.runtime import unused_loopback_port

HISTORY = [
    {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.6, "train_rows": 100},
    {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.7, "val_loss": 0.9, "val_accuracy": 0.75, "train_rows": 100},
]


def _run_folder(workspace: str, run_name: str = "r1"):
    config = load_config("image", overrides={"workspace": workspace, "train.run_name": run_name, "train.lr": 0.002})
    run_uri = config.run_uri()
    storage.write_json(storage.join(run_uri, "history.json"), HISTORY)
    storage.write_json(storage.join(run_uri, "train_summary.json"), {"run_name": run_name})
    storage.write_bytes(storage.join(run_uri, "curves.png"), b"\x89PNG\r\n\x1a\nnot-really")
    summary = {"checkpoint": storage.join(run_uri, "checkpoint_000001"), "epochs_completed": 2}
    return config, summary


def test_train_evaluate_register_land_in_one_run_read_back_by_mlflow_client(tmp_path):
    from mlflow import MlflowClient

    config, summary = _run_folder(str(tmp_path / "ws"))
    trained = tracking.log_training(config, summary)
    assert trained["warnings"] == [] and trained["uri"] == f"sqlite:///{tmp_path}/ws/mlflow.db"
    evaluation = config.evaluation_uri()
    storage.write_json(storage.join(evaluation, "report.json"), {"accuracy": 0.8, "rows": 40, "classes": ["a", "b"]})
    storage.write_bytes(storage.join(evaluation, "confusion_matrix.png"), b"\x89PNG")
    evaluated = tracking.log_evaluation(
        config, {"accuracy": 0.8, "rows": 40, "model": "m"}, evaluation, ["report.json", "confusion_matrix.png"]
    )
    registered = tracking.log_registration(config, 3, "production", "/models/image/3")
    assert evaluated["run_id"] == registered["run_id"] == trained["run_id"]

    client = MlflowClient(trained["uri"])
    experiment = client.get_experiment_by_name("ray_app-image")
    run = client.get_run(trained["run_id"])
    assert run.info.experiment_id == experiment.experiment_id
    assert run.data.params["train.lr"] == "0.002" and run.data.params["train.run_name"] == "r1"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [(1, 0.6), (2, 0.75)]
    assert run.data.metrics["test_accuracy"] == 0.8
    assert run.data.tags["ray_app.registered_version"] == "3" and run.data.tags["ray_app.registered_alias"] == "production"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "evaluation")
    }
    assert {"curves.png", "history.json", "train_summary.json", "evaluation/report.json", "evaluation/confusion_matrix.png"} <= artifacts
    # Artifacts live beside the database, not in ./mlruns of whatever the working directory was.
    assert os.path.isfile(tmp_path / "ws" / "mlartifacts" / run.info.run_id / "artifacts" / "curves.png")

    # A resumed train of the same run name adds to the same MLflow run (params are write-once).
    again = tracking.log_training(config, summary)
    assert again["run_id"] == trained["run_id"] and again["warnings"] == []
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2  # each epoch once


def test_a_dead_tracking_server_is_a_warning_and_the_run_files_stay(tmp_path):
    port = unused_loopback_port()  # nothing listens there
    workspace = str(tmp_path / "ws")
    config, summary = _run_folder(workspace)
    config.tracking.uri = f"http://127.0.0.1:{port}"
    before = sorted(os.listdir(config.run_uri()))
    result = tracking.log_training(config, summary)
    assert result["run_id"] is None
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("tracking failed") and str(port) in json.dumps(result)
    assert sorted(os.listdir(config.run_uri())) == before  # nothing lost, no run id recorded


def test_a_remote_workspace_without_a_server_says_what_it_needs():
    config = load_config("image", overrides={"workspace": "s3://bucket/ws"})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracker = tracking.Tracker(config)
    assert tracker.uri is None and not tracker.active
    assert "mlflow server" in tracker.warnings[0] and "--tracking-uri" in tracker.warnings[0]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    config = load_config("image", overrides={"workspace": str(tmp_path)})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(config) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert tracking.tracking_uri(config) == "http://head:5000"
    config.tracking.uri = "http://other:5000"
    assert tracking.tracking_uri(config) == "http://other:5000"


def test_nothing_on_the_serving_path_imports_mlflow():
    """Every ray_app.serving module (a replica's import path) and a loaded model's request path stay
    free of mlflow: ``import mlflow`` alone takes ~1.5 s of a cold start."""
    code = (
        "import importlib, pkgutil, sys, ray_app.serving as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('ray_app.serving.' + m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('mlflow', 'sqlalchemy', 'alembic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


CHROMIUM = "/usr/bin/chromium"


def _mlflow_ui_bin() -> str | None:
    """An `mlflow` executable that can serve the UI: MLFLOW_UI_BIN (e.g. another venv's), or this
    venv's when the full mlflow (the `mlflow-ui` extra, which ships the UI build) is installed."""
    if os.environ.get("MLFLOW_UI_BIN"):
        return os.environ["MLFLOW_UI_BIN"]
    import mlflow

    ui_build = os.path.join(os.path.dirname(mlflow.__file__), "server", "js", "build", "index.html")
    local = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return local if os.path.isfile(ui_build) and os.path.isfile(local) else None


def test_mlflow_ui_shows_the_runs_in_headless_chromium(tmp_path):
    """`mlflow ui` on a store this project wrote renders the experiment and the run (needs the
    `mlflow-ui` extra, or MLFLOW_UI_BIN pointing at an `mlflow` of the same version)."""
    mlflow_bin = _mlflow_ui_bin()
    if mlflow_bin is None:
        pytest.skip("`mlflow ui` needs the full mlflow: pip install -e '.[mlflow-ui]' (or set MLFLOW_UI_BIN)")
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: `make setup` installs Debian's chromium")
    config, summary = _run_folder(str(tmp_path / "ws"), run_name="ui-run")
    tracked = tracking.log_training(config, summary)
    assert tracked["warnings"] == []
    port = unused_loopback_port()
    server = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", tracked["uri"], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # No job runner (a second process importing mlflow, for GenAI jobs): it slowed start and stop here.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        import requests

        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
            time.sleep(0.5)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                experiment_id = tracking.recorded_run(config.run_uri())["experiment_id"]
                page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs")
                page.get_by_text("ui-run").first.wait_for(timeout=60_000)
                assert "ray_app-image" in page.inner_text("body")
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
