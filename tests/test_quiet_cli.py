"""A quiet, informative CLI: a stage prints its own progress, then its summary; Ray's own lines go to
its log files unless --verbose; deprecations raised from our code fail the tests."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr

import pytest
from ray._private.ray_logging import global_worker_stdstream_dispatcher

from ray_app import progress
from ray_app.local_cluster import session_dir


def test_deprecations_raised_from_ray_app_code_are_errors_and_libraries_are_not():
    """pyproject's filterwarnings: the module a warning is attributed to decides."""
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old call", DeprecationWarning, "ray_app/engine/train.py", 1, module="ray_app.engine.train")
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("old call", FutureWarning, "ray_app/serving/app.py", 1, module="ray_app.serving.app")
    warnings.warn_explicit("their call", DeprecationWarning, "somelib/x.py", 1, module="somelib.x")  # ignored


def test_stage_and_epoch_lines_are_short_and_carry_metrics_and_eta():
    assert progress.stage_line("prepare", "image") == "prepare (image): started"
    done = progress.stage_line("prepare", "image", {"rows_in": 10, "rows_ok": 9, "rows_rejected": 1, "output": "/x"}, 3.21)
    assert done == "prepare (image): done in 3.2 s: rows_in 10, rows_ok 9, rows_rejected 1"
    trained = progress.stage_line("train", "ctr", {"epochs_completed": 2, "metrics": {"val_accuracy": 0.912345}}, 40)
    assert trained == "train (ctr): done in 40.0 s: epochs_completed 2, val_accuracy 0.9123"
    line = progress.epoch_line(2, 5, {"train_loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.9, "lr": 1e-3}, 12.0)
    assert line == f"{progress.PROGRESS_MARK}train epoch 2/5: train_loss 0.5, val_loss 0.25, val_accuracy 0.9; 12.0 s/epoch, ETA 36 s"


def test_only_progress_lines_of_workers_reach_the_driver():
    """Ray's own dispatcher of worker output: after the switch, a batch of worker lines prints only
    the marked ones, without the mark."""
    batch = {"lines": ["INFO some Ray internals", progress.PROGRESS_MARK + "train epoch 1/2: x", "a warning"], "pid": 1, "ip": "x"}
    err = io.StringIO()
    try:
        assert progress.show_only_progress_from_workers()
        with redirect_stderr(err):
            global_worker_stdstream_dispatcher.emit(batch)
            global_worker_stdstream_dispatcher.emit(batch)  # the same line delivered again is shown once
    finally:
        global_worker_stdstream_dispatcher.remove_handler("ray_app_progress")
    assert err.getvalue() == "train epoch 1/2: x\n"


def test_ray_driver_lines_wait_for_the_session_log_file_and_leave_the_console(tmp_path):
    serve_logger = logging.getLogger("ray.serve")  # configured by Serve: its own console handler, no propagation
    loggers = [logging.getLogger("ray"), serve_logger]
    console = [h for lg in loggers for h in lg.handlers if type(h).__name__ == "PlainRayHandler" or type(h) is logging.StreamHandler]
    levels = [h.level for h in console]
    driver_log = progress.DriverLog()
    try:
        progress.quiet_ray_console(driver_log)
        assert console and all(h.level == logging.ERROR for h in console)
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")  # before the session exists
        driver_log.attach(str(tmp_path))
        serve_logger.warning("a deployment warning")  # after
    finally:
        for handler, level in zip(console, levels, strict=True):
            handler.setLevel(level)
        driver_log.close()
    written = (tmp_path / progress.DRIVER_LOG_FILE).read_text()
    assert "Started a local Ray instance." in written and "a deployment warning" in written


@pytest.mark.own_cluster
def test_a_stage_in_a_log_prints_its_progress_not_ray_internals(tmp_path, shared_head):
    """prepare + train in a job-like process (stderr not a terminal) on a running cluster (the
    session's shared head), as a job's driver is: a start and an end line per stage, one line per
    epoch with an ETA, the JSON summaries, and none of Ray's INFO/WARNING lines; those are in the
    driver log in Ray's session folder."""
    from ray_app.demos.data import write_image_folders

    write_image_folders(str(tmp_path / "digits"), limit=60)
    ws = ["--workspace", str(tmp_path / "ws"), "--address", shared_head["address"]]
    script = (
        "import sys; from ray_app.cli import run_cli; "
        f"run_cli(['image', 'prepare', '--input', {str(tmp_path / 'digits')!r}, *{ws!r}]); "
        f"run_cli(['image', 'train', *{ws!r}, '--epochs', '2', '--num-workers', '1', '--batch-size', '32'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=shared_head["env"], stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert [line for line in lines if line.startswith(("prepare (image)", "train (image)"))] == [
        "prepare (image): started",
        next(line for line in lines if line.startswith("prepare (image): done in")),
        "train (image): started",
        next(line for line in lines if line.startswith("train (image): done in")),
    ]
    epochs = [line for line in lines if line.startswith("train epoch")]
    assert [line.split(":")[0] for line in epochs] == ["train epoch 1/2", "train epoch 2/2"] and "ETA" in epochs[0]
    ray_lines = [line for line in lines if " INFO " in line or " WARNING " in line or "pid=" in line]
    assert not ray_lines, ray_lines
    assert len(lines) <= 12, "\n".join(lines)
    session_logs = os.path.join(session_dir(shared_head["address"]), "logs")  # not session_latest: the main suite's Ray runs beside it
    assert "Connecting to existing Ray cluster" in open(os.path.join(session_logs, progress.DRIVER_LOG_FILE)).read()
