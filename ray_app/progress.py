"""What a user sees while a stage runs: the stage's own progress, then its summary.

In a terminal, Ray Data draws its progress bars. In a log (``ray job submit``, CI: stderr is not a
terminal) there are no bars; instead a stage prints a short line when it starts and when it ends,
and training prints one line per epoch (from rank 0) with its metrics and an ETA.

Ray's own INFO and WARNING lines — the driver's, and the workers' output that Ray copies to the
driver — stay in Ray's log files (``/tmp/ray/session_latest/logs``; the driver's in
``ray_app-driver.log`` there) unless ``--verbose`` asks for them. Progress lines printed by workers
start with ``PROGRESS_MARK`` and are the only worker output shown by default.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

PROGRESS_MARK = "[ray_app] "
DRIVER_LOG_FILE = "ray_app-driver.log"
# Keys worth a glance in a stage's one-line summary, in this order (the full summary follows as JSON).
SUMMARY_KEYS = (
    "rows_in",
    "rows_ok",
    "rows_rejected",
    "epochs_completed",
    "val_accuracy",
    "accuracy",
    "auc",
    "version",
    "endpoint",
)


def in_terminal() -> bool:
    return os.isatty(2)


def say(line: str) -> None:
    """A progress line: stderr, so a stage's JSON summary on stdout stays machine-readable."""
    print(line, file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_line(stage: str, workload: str, result: dict[str, Any] | None = None, seconds: float | None = None) -> str:
    """``train (image): started`` or ``train (image): done in 41.2 s: epochs_completed 4, val_accuracy 0.93``."""
    if result is None:
        return f"{stage} ({workload}): started"
    metrics = {**result, **(result.get("metrics") or {})}
    shown = ", ".join(f"{key} {_fmt(metrics[key])}" for key in SUMMARY_KEYS if metrics.get(key) is not None)
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    return f"{stage} ({workload}): done{took}" + (f": {shown}" if shown else "")


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any], seconds_per_epoch: float) -> str:
    """One training epoch, with what is left: printed by rank 0 after the epoch's report."""
    shown = ", ".join(
        f"{key} {_fmt(metrics[key])}" for key in ("train_loss", "val_loss", "val_accuracy", "train_samples_per_s") if key in metrics
    )
    eta = seconds_per_epoch * (epochs - epoch)
    return f"{PROGRESS_MARK}train epoch {epoch}/{epochs}: {shown}; {seconds_per_epoch:.1f} s/epoch, ETA {eta:.0f} s"


# ---- keeping Ray's own lines in its log files --------------------------------------------------
def _ray_loggers() -> Iterable[logging.Logger]:
    names = [name for name in logging.Logger.manager.loggerDict if name == "ray" or name.startswith("ray.")]
    return (logging.getLogger(name) for name in names)


class DriverLog:
    """The driver's Ray log records, kept for ``ray_app-driver.log`` in the session's log folder:
    records from before the session exists (``ray.init`` itself) wait in memory until it does."""

    def __init__(self) -> None:
        self.sink = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.sink.setLevel(logging.INFO)
        self.loggers: list[logging.Logger] = []

    def cover(self, logger: logging.Logger) -> None:
        if self.sink not in logger.handlers:
            logger.addHandler(self.sink)
            self.loggers.append(logger)

    def attach(self, logs_dir: str | None) -> None:
        """From now on records go straight to the file (none when there is no local log folder)."""
        if logs_dir:
            to_file = logging.FileHandler(os.path.join(logs_dir, DRIVER_LOG_FILE))
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.sink.setTarget(to_file)
            self.sink.flushLevel = logging.NOTSET  # every record is flushed as it comes
            self.sink.flush()
        else:
            self.close()

    def close(self) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.sink)
        self.loggers.clear()
        target = self.sink.target
        self.sink.close()
        if target is not None:
            target.close()


_driver_log: DriverLog | None = None  # this process's, once ``start_driver_log`` made it


def start_driver_log() -> DriverLog:
    global _driver_log
    if _driver_log is None:
        _driver_log = DriverLog()
    return _driver_log


def quiet_ray_console(driver_log: DriverLog | None = None) -> None:
    """Ray's console handlers (the driver's INFO/WARNING lines: start-up, Data plans, Serve
    deployments) show errors only; what they no longer show goes to ``driver_log``, and Ray's own
    file handlers (e.g. Ray Data's ``ray-data.log``) keep everything. Called again after a stage
    imports Ray libraries, since those set up their loggers on import."""
    driver_log = driver_log or _driver_log
    for logger in _ray_loggers():
        console = [h for h in logger.handlers if type(h) is logging.StreamHandler or type(h).__name__ == "PlainRayHandler"]
        for handler in console:
            handler.setLevel(logging.ERROR)
        if driver_log is not None and console:
            driver_log.cover(logger)


def show_only_progress_from_workers() -> bool:
    """Of the worker output Ray copies to the driver, print only progress lines (the rest stays
    in the workers' log files). Ray offers no public hook for this: if its dispatcher moves, every
    line is shown as before and this returns False."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False

    shown: collections.deque[str] = collections.deque(maxlen=256)

    def progress_only(data: dict[str, Any]) -> None:
        for line in data.get("lines", []):
            # Ray can deliver a Train worker's line twice (seen with Ray Train 2.60): print it once.
            if line.startswith(PROGRESS_MARK) and line not in shown:
                shown.append(line)
                say(line[len(PROGRESS_MARK) :])

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("ray_app_progress")
    dispatcher.add_handler("ray_app_progress", progress_only)
    return True
