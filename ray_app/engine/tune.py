"""tune: a Ray Tune sweep over the train stage's own loop (``train_loop_per_worker``), ASHA on the
validation metric, each trial an ordinary training run (``<runs>/<sweep>-<trial id>/``) and an
MLflow child run; the best trial is finished like ``train``, evaluated and registered through
``run_register`` (promotion gate included).

Ray Train V2 (the default in Ray 2.60) runs a trainer inside a Tune trial: each trial is a small
driver function that builds a ``TorchTrainer`` and forwards its reports to Tune
(``TuneReportCallback``). The trial driver reserves a token CPU share; its training workers the rest.
Train V2 refuses ``ray.train`` calls inside a Tune function itself, so a trial cannot run the loop
in its own process: every trial starts a Train controller and a worker group.

Where a small sweep's time went (3 trials of 1 worker on 300 digits, 2 cores): not the model, but
Ray Data. Each trial re-read its splits from Parquet every epoch through ``streaming_split``
coordinator actors; those read tasks are submitted from inside the Train controller's actors and
carry their runtime environment, so they need workers of their own rather than Ray's pooled ones
(Ray warned of 22 Python worker processes on 2 cores): an epoch of 243 rows took 18-28 s, and
the sweep had not ended after 160 s. With the splits read once, an epoch takes 1-3 s. Now the sweep reads small splits once, in the driver, into the object store
(``materialize``; every trial then streams the same blocks, no read task per epoch); a one-worker
trial iterates them itself (no coordinator actors); and the trial's Train controller polls its
workers every 0.2 s instead of 2 s, so each epoch's result reaches ASHA, and a finished or stopped
trial frees its CPUs, without waiting out the poll. Splits too large for that are streamed per
trial as ``train`` streams them.

Scheduling: trials run ``max_concurrent_trials`` at a time, each with ``train.num_workers``
workers. By default as many trials run at once as the cluster's CPUs hold one worker per CPU,
keeping one CPU for Ray Data; on 2 cores that is 2 trials of 1 worker, 0.49 CPU each: the third
trial starts when one of the first two ends or is stopped by ASHA.

An interrupted sweep (driver crash) resumes with the same ``--name``: ``Tuner.restore`` picks up
the experiment state, unfinished trials restart from their own checkpoints.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from typing import Any

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_app import storage, tracking
from ray_app.config import AppConfig, save_config
from ray_app.engine.train import (
    _finish,
    build_train_loop_config,
    poll_workers_often,
    splits_read_once,
    train_loop_per_worker,
    training_data_config,
    training_datasets,
)
from ray_app.prepared import data_fingerprint, load_manifest
from ray_app.workloads import get_workload

log = logging.getLogger(__name__)

TRAIN_KEYS = ("lr", "weight_decay", "batch_size")
# Per-workload default spaces: the CNN learns fast at higher rates and its width is cheap to vary;
# a pretrained Transformer is fine-tuned at small rates; the CTR model varies its embedding size.
DEFAULT_SEARCH_SPACES: dict[str, dict[str, dict[str, list[Any]]]] = {
    "image": {
        "lr": {"loguniform": [1e-3, 1e-2]},
        "weight_decay": {"choice": [0.0, 1e-4, 1e-3]},
        "batch_size": {"choice": [32, 64]},
        "width": {"choice": [8, 16, 32]},
    },
    "text": {"lr": {"loguniform": [1e-5, 1e-4]}, "weight_decay": {"choice": [0.0, 0.01]}, "batch_size": {"choice": [16, 32]}},
    "ctr": {
        "lr": {"loguniform": [1e-3, 3e-2]},
        "weight_decay": {"choice": [0.0, 1e-5, 1e-4]},
        "batch_size": {"choice": [256, 1024]},
        "embedding_dim": {"choice": [4, 8, 16]},
    },
}
HISTORY_KEYS = ("epoch", "val_accuracy", "val_loss", "train_loss", "train_accuracy")
RESULTS_CSV, RESULTS_JSON, TRIALS_PNG = "results.csv", "results.json", "trials.png"


def resolved_space(config: AppConfig) -> dict[str, dict[str, list[Any]]]:
    """The workload's default space with the config's keys over it; option keys are checked."""
    space = {**DEFAULT_SEARCH_SPACES.get(config.workload, {}), **config.tune.search_space}
    options = get_workload(config.workload).Options.model_fields
    for key, spec in space.items():
        if key not in TRAIN_KEYS and key not in options:
            raise ValueError(f"tune: cannot search {key!r}: not one of {list(TRAIN_KEYS)} nor a {config.workload} option")
        if len(spec) != 1 or next(iter(spec)) not in ("grid", "choice", "loguniform", "uniform"):
            raise ValueError(f"tune: search space for {key!r} must be one of grid/choice/loguniform/uniform: [...], got {spec}")
    return space


def tune_domains(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    domains = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid":
            domains[key] = tune.grid_search(values)
        elif kind == "choice":
            domains[key] = tune.choice(values)
        elif kind == "loguniform":
            domains[key] = tune.loguniform(*values)
        else:
            domains[key] = tune.uniform(*values)
    return domains


# A trial's driver only starts a TorchTrainer (whose controller takes no CPU); Tune refuses a
# placement group with nothing in it, so it holds a token share.
TRIAL_DRIVER_CPU = 0.01


def trial_scheduling(cluster_cpus: float, num_workers: int, requested: int | None) -> tuple[int, float]:
    """(trials at once, CPUs per training worker). One whole CPU stays free for Ray Data's read
    tasks (1 CPU each): workers that hold every CPU would wait for shards forever."""
    concurrent = requested or max(1, math.floor(cluster_cpus / num_workers))
    usable = max(1.0, cluster_cpus - 1) - concurrent * TRIAL_DRIVER_CPU
    return concurrent, round(max(0.25, min(1.0, usable / (concurrent * num_workers))), 3)


def worker_groups(bundle: dict[str, float], num_workers: int) -> set[str]:
    """Placement groups (hex ids) alive now with the shape of a trial's Train worker group."""
    from ray.util import placement_group_table

    shape = {index: bundle for index in range(num_workers)}
    return {pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED" and pg["bundles"] == shape}


# How long after a sweep its stopped trials' workers may take to die (their owners are gone; Ray
# kills them asynchronously) before a group they still sit in is left alone.
ORPHAN_WAIT_S = 15.0


def release_orphaned_worker_groups(
    before: set[str], bundle: dict[str, float], num_workers: int, wait_s: float = ORPHAN_WAIT_S
) -> list[str]:
    """Remove the worker groups a sweep's Train runs left behind; returns their ids.

    Ray Train hands a worker group's placement group to its cleaner only once the group has
    started: a trial stopped in between (ASHA stops trials) leaves the group's CPUs reserved until
    the driver exits, so in a notebook or any long-lived driver the next stage waits for CPUs.
    Removed: groups of the trial worker shape that appeared since ``before`` (taken before the
    sweep) and hold no live actor. A stopped trial's workers die shortly after ``fit`` returns, so
    groups that still hold live actors are looked at again for up to ``wait_s``; a group another
    run is using keeps its live workers, so it stays."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    orphans: list[str] = []
    deadline = time.monotonic() + wait_s
    while pending := sorted(worker_groups(bundle, num_workers) - before - set(orphans)):
        for pg_id in pending:
            try:
                live = list_actors(filters=[("placement_group_id", "=", pg_id), ("state", "!=", "DEAD")], raise_on_missing_output=False)
            except Exception as error:  # no State API (no dashboard): leave it, as Ray would
                log.warning("tune: cannot tell whether placement group %s is still used (%s); left in place", pg_id, error)
                return orphans
            if not live:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
                orphans.append(pg_id)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if orphans:
        log.warning("tune: removed %d placement group(s) Ray Train left behind: %s", len(orphans), orphans)
    return orphans


def run_trial(params: dict[str, Any], base: dict[str, Any], settings: dict[str, Any], splits: dict[str, Any] | None) -> None:
    """One trial: the train stage's loop with the trial's values, as an ordinary run folder."""
    from ray.tune.integration.ray_train import TuneReportCallback

    loop_config = {**base, "options": dict(base["options"])}
    for key, value in params.items():
        if key in TRAIN_KEYS:
            loop_config[key] = value
        else:
            loop_config["options"][key] = value
    run_name = f"{settings['name']}-{tune.get_context().get_trial_id()}"
    loop_config["run_name"] = run_name
    loop_config["splits_in_memory"] = splits
    workload = get_workload(base["workload"])
    poll_workers_often()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=settings["num_workers"], resources_per_worker={"CPU": settings["cpus_per_worker"]}),
        run_config=RunConfig(
            name=run_name,
            storage_path=settings["runs_uri"],
            failure_config=FailureConfig(max_failures=settings["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
        datasets=training_datasets(splits, settings["data_uri"], workload, base["seed"]),
        dataset_config=training_data_config(settings["num_workers"]),
    )
    trainer.fit()


def run_tune(config: AppConfig) -> dict[str, Any]:
    started = time.perf_counter()
    t, sweep = config.train, config.tune
    workload = get_workload(config.workload)
    data_uri = config.train_data_uri()
    manifest = load_manifest(data_uri)
    options = workload.resolve_options("train", config.options, manifest.get("options"))
    fingerprint = data_fingerprint(data_uri)
    space = resolved_space(config)
    base = build_train_loop_config(config, options, manifest, fingerprint)
    # A trial reports once per epoch: ASHA's rungs are epochs, so no step checkpoints in a sweep.
    base.update(epochs=sweep.epochs, checkpoint_every_steps=0)
    concurrent, cpus = trial_scheduling(ray.cluster_resources().get("CPU", 0), t.num_workers, sweep.max_concurrent_trials)
    settings = {
        "name": sweep.name,
        "num_workers": t.num_workers,
        "cpus_per_worker": t.cpus_per_worker or cpus,
        "runs_uri": config.runs_uri(),
        "data_uri": data_uri,
        "max_failures": t.max_failures,
    }
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    splits = None if config.train.stream_splits else splits_read_once(data_uri, workload, object_store)
    settings["read_once"] = splits is not None
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, settings=settings, splits=splits), {"CPU": TRIAL_DRIVER_CPU})
    sweep_root = storage.join(config.runs_uri(), "tune")
    sweep_uri = storage.join(sweep_root, sweep.name)
    restored = tune.Tuner.can_restore(sweep_uri)
    if restored:
        log.info("tune: resuming sweep %r from %s", sweep.name, sweep_uri)
        tuner = tune.Tuner.restore(sweep_uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=sweep.epochs,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_domains(space),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                scheduler=scheduler,
                num_samples=sweep.num_samples,
                max_concurrent_trials=concurrent,
                # The limit must sit on the search algorithm itself: given an explicit one, Tune
                # ran all 3 trials of a grid at once on 2 CPUs (Ray Data then had no CPU left).
                search_alg=tune.search.BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrent),
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=sweep_root, verbose=0),
        )
    worker_bundle = {"CPU": settings["cpus_per_worker"]}
    groups_before = worker_groups(worker_bundle, t.num_workers)
    try:
        grid = tuner.fit()
    finally:
        release_orphaned_worker_groups(groups_before, worker_bundle, t.num_workers)
    trials = trial_rows(grid, sweep.name, sweep.epochs, sweep.metric)
    finished = [row for row in trials if row[f"last_{sweep.metric}"] is not None and row["checkpoint_path"]]
    if not finished:
        raise RuntimeError(f"tune: no trial finished: {[row['error'] for row in trials]}")
    best = best_trial(finished, sweep.metric, sweep.mode)
    write_results(sweep_uri, trials, grid, sweep.metric)
    summary: dict[str, Any] = {
        "sweep": sweep.name,
        "output": sweep_uri,
        "resumed": restored,
        "trials": len(trials),
        "stopped_early": [row["trial_id"] for row in trials if row["stopped_early"]],
        "concurrent_trials": concurrent,
        "workers_per_trial": t.num_workers,
        "cpus_per_worker": settings["cpus_per_worker"],
        "splits_read_once": settings["read_once"],
        "best": {k: best[k] for k in ("trial_id", "run_name", "params", f"last_{sweep.metric}", "epochs")},
    }
    best_config = best_trial_config(config, best)
    # TuneReportCallback passes the Train checkpoint's path (no scheme) in the trial's metrics.
    runs_uri = config.runs_uri()
    checkpoint = f"{runs_uri.split('://', 1)[0]}://{best['checkpoint_path']}" if storage.is_remote(runs_uri) else best["checkpoint_path"]
    # The best trial becomes a finished run like `train` leaves one: evaluate/register/serve use it.
    _finish(best_config, checkpoint, started, trained=True, tuned=sweep.name)
    save_config(best_config, best_config.run_uri(), "train")
    summary["tracking"] = track_sweep(config, best_config, trials, sweep_uri)
    if sweep.register_best:
        from ray_app.engine.evaluate import run_evaluate
        from ray_app.engine.register import run_register

        summary["evaluated"] = run_evaluate(best_config)
        summary["registered"] = run_register(best_config)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def best_trial(finished: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The trial with the best last ``metric``; a tie (validation accuracy on a small split often
    ties) goes to the lower last validation loss, then to the lower trial id. Never to the order the
    results come in: a restored sweep lists its trials in another order than the run that made them,
    and ``tune`` run again must name the same best trial (and register the same model)."""
    sign = 1 if mode == "max" else -1

    def loss(row: dict[str, Any]) -> float:
        value = row.get("last_val_loss")
        return math.inf if value is None or math.isnan(value) else value

    return min(finished, key=lambda row: (-sign * row[f"last_{metric}"], loss(row), row["trial_id"]))


def best_trial_config(config: AppConfig, best: dict[str, Any]) -> AppConfig:
    """The config a plain ``train`` would need to produce the best trial."""
    tree = config.model_dump()
    tree["train"].update({k: v for k, v in best["params"].items() if k in TRAIN_KEYS}, run_name=best["run_name"], epochs=config.tune.epochs)
    tree["options"] = {**tree["options"], **{k: v for k, v in best["params"].items() if k not in TRAIN_KEYS}}
    return AppConfig.model_validate(tree)


def trial_rows(grid: Any, name: str, max_epochs: int, metric: str) -> list[dict[str, Any]]:
    rows = []
    for index, result in enumerate(grid):
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        history = [
            h for h in history if "val_accuracy" in h and not (isinstance(h.get("val_accuracy"), float) and math.isnan(h["val_accuracy"]))
        ]
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        trial_id = trial_id or result.path.rstrip("/").rsplit("_", 2)[-2]
        last = history[-1] if history else {}
        row = {
            "index": index,
            "trial_id": trial_id,
            "run_name": f"{name}-{trial_id}",
            "params": result.config,
            "epochs": int(last.get("epoch", 0)),
            # ASHA stopped it: ended without error before the last epoch.
            "stopped_early": result.error is None and 0 < int(last.get("epoch", 0)) < max_epochs,
            "error": None if result.error is None else f"{type(result.error).__name__}: {str(result.error)[:300]}",
            "history": [{k: h[k] for k in h if k in HISTORY_KEYS or k == metric} for h in history],
            "checkpoint_path": (result.metrics or {}).get("checkpoint_path"),
        }
        for key in {"val_accuracy", "val_loss", metric}:
            row[f"last_{key}"] = last.get(key)
        rows.append(row)
    return rows


def write_results(sweep_uri: str, trials: list[dict[str, Any]], grid: Any, metric: str) -> None:
    storage.write_json(storage.join(sweep_uri, RESULTS_JSON), trials)
    buffer = io.StringIO()
    fields = ["trial_id", "run_name", "epochs", "stopped_early", "last_val_accuracy", "last_val_loss", "error"]
    param_keys = sorted({k for row in trials for k in row["params"]})
    writer = csv.DictWriter(buffer, fieldnames=[*fields, *param_keys])
    writer.writeheader()
    for row in trials:
        writer.writerow({**{k: row[k] for k in fields}, **row["params"]})
    storage.write_bytes(storage.join(sweep_uri, RESULTS_CSV), buffer.getvalue().encode())
    storage.write_bytes(storage.join(sweep_uri, TRIALS_PNG), trials_plot(trials, metric))


def trials_plot(trials: list[dict[str, Any]], metric: str) -> bytes:
    from matplotlib.figure import Figure

    from ray_app.plots import _png

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for row in trials:
        epochs = [h["epoch"] for h in row["history"]]
        values = [h.get(metric) for h in row["history"]]
        label = f"{row['trial_id']} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        ax.plot(epochs, values, marker="x" if row["stopped_early"] else "o", label=label + (" (stopped)" if row["stopped_early"] else ""))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per trial")
    ax.legend(fontsize=6)
    return _png(fig)


def track_sweep(config: AppConfig, best_config: AppConfig, trials: list[dict[str, Any]], sweep_uri: str) -> dict[str, Any]:
    """A parent MLflow run for the sweep, one child run per trial (the trial's run folder records
    it, so evaluate/register of the best trial add to its child run)."""
    tracker = tracking.Tracker(config)
    if not tracker.active:
        return tracker.summary()
    parent = tracker.open_run(config.tune.name, sweep_uri, tags={"ray_app.stage": "tune"})
    if not parent:
        return tracker.summary()
    tracker.log_params(tracking.flatten(config.tune.model_dump(mode="json"), "tune"))
    tracker.log_files(sweep_uri, (RESULTS_CSV, RESULTS_JSON, TRIALS_PNG))
    children = {}
    for row in trials:
        run_uri = storage.join(config.runs_uri(), row["run_name"])
        child = tracking.Tracker(config)
        tags = {"ray_app.stage": "tune-trial", "ray_app.trial_id": row["trial_id"], "ray_app.stopped_early": row["stopped_early"]}
        if child.open_run(row["run_name"], run_uri, tags={k: str(v) for k, v in tags.items()}, parent_run_id=parent):
            child.log_params({**tracking.flatten(row["params"]), "epochs_run": row["epochs"]})
            child.log_metrics(
                only_new_steps=True,
                rows=[(int(h["epoch"]), tracking.numeric_metrics({k: v for k, v in h.items() if k != "epoch"})) for h in row["history"]],
            )
            if row["run_name"] == best_config.train.run_name:
                child.log_files(run_uri, tracking.TRAIN_ARTIFACTS)
                child.set_tags({"ray_app.best_trial": "true"})
            child.finish_run("FINISHED" if row["error"] is None else "FAILED")
            children[row["trial_id"]] = child.run_id
        tracker.warnings += child.warnings
    tracker.set_tags({"ray_app.best_trial": best_config.train.run_name})
    tracker.finish_run()
    return {**tracker.summary(), "child_runs": children}
