"""evaluate: score the held-out test split with Ray Data and write a report (JSON + PNG)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
from ray.data.expressions import col

from ray_app import storage, tracking
from ray_app.bundle import BUNDLE_FILE
from ray_app.config import AppConfig, save_config
from ray_app.engine.scoring import PreparedRowScorer, refuse_other_data_shape, stage_options
from ray_app.engine.train import latest_checkpoint_uri
from ray_app.engine.warm import stateful_map
from ray_app.prepared import load_manifest, ok_uri, read_split
from ray_app.registry import resolve_model_uri
from ray_app.workloads import get_workload

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"


def evaluation_model_uri(config: AppConfig) -> str:
    if config.evaluate.model:
        return resolve_model_uri(config.models_uri(), config.workload, config.evaluate.model)
    return latest_checkpoint_uri(config)


def _score_splits(config: AppConfig, workload: Any, model_uri: str, splits: tuple[str, ...]) -> dict[str, tuple[Any, Any, Any]]:
    """split -> (labels, probabilities, groups or None) for the non-empty ones among ``splits``,
    scored in one pass (one actor start-up, however many splits)."""
    columns = [*workload.training_columns, *([workload.group_column] if workload.group_column else [])]
    if len(splits) == 1:
        rows = read_split(config.train_data_uri(), splits[0], columns)
    else:
        rows = ray.data.read_parquet(ok_uri(config.train_data_uri())).select_columns([*columns, "split"])
        rows = rows.filter(expr=col("split").is_in(list(splits)))
    # One worker: a small held-out set is scored faster by one warm worker than by two cold ones.
    counts = load_manifest(config.train_data_uri()).get("splits", {})
    scored = stateful_map(
        rows,
        PreparedRowScorer,
        {"bundle_uri": model_uri},
        rows=sum(counts[s] for s in splits) if all(s in counts for s in splits) else None,
        batch_size=config.evaluate.batch_size,
        max_workers=1,
        batch_format="numpy",
    )
    parts: dict[str, dict[str, list]] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        batch_splits = batch["split"] if "split" in batch else np.full(len(batch["label"]), splits[0], dtype=object)
        for split in set(batch_splits.tolist()):
            mask = batch_splits == split
            part = parts.setdefault(split, {"label": [], "probabilities": [], "group": []})
            part["label"].append(batch["label"][mask])
            part["probabilities"].append(np.stack(batch["probabilities"])[mask])
            if "group" in batch:
                part["group"].append(batch["group"][mask])
    return {
        split: (np.concatenate(p["label"]), np.concatenate(p["probabilities"]), np.concatenate(p["group"]) if p["group"] else None)
        for split, p in parts.items()
    }


def run_evaluate(config: AppConfig) -> dict[str, Any]:
    workload = get_workload(config.workload)
    model_uri = evaluation_model_uri(config)
    bundle_info = storage.read_json(storage.join(model_uri, BUNDLE_FILE))
    # The model's recorded options; a contradicting flag is refused before anything is scored.
    options = stage_options(config.workload, "evaluate", config.options, model_uri)
    refuse_other_data_shape(config.workload, load_manifest(config.train_data_uri())["options"], model_uri)
    # Medical evaluation: bootstrap CIs resample groups (patients), and decision thresholds are
    # chosen on the validation split's scores, never on the test split they are reported on.
    with_validation = workload.uses_validation_scores(bundle_info["manifest"])
    scored = _score_splits(config, workload, model_uri, ("test", "val") if with_validation else ("test",))
    if "test" not in scored:
        raise ValueError("the test split is empty: prepare with --test-fraction > 0")
    labels, probabilities, groups = scored["test"]
    context: dict[str, Any] = {}
    if workload.group_column:
        context["groups"] = groups
    if with_validation:
        context["validation"] = scored["val"][:2] if "val" in scored else None
        # A workload that chooses thresholds on validation has this per-run evaluate option.
        context["threshold_rule"] = options.threshold_rule
    report, figures = workload.evaluation_report(labels, probabilities, bundle_info["manifest"]["classes"], **context)
    report["model"] = model_uri
    # Ties the report to the exact weights it scored: register refuses it for any other checkpoint.
    report["weights_sha256"] = bundle_info["weights_sha256"]
    report.update(workload.evaluation_extras(config.train_data_uri(), options, bundle_info["manifest"]))
    output = config.evaluation_uri()
    storage.write_json(storage.join(output, REPORT_FILE), report)
    if "confusion_matrix" in report:
        storage.write_json(
            storage.join(output, "confusion_matrix.json"), {"classes": report["classes"], "matrix": report["confusion_matrix"]}
        )
    for name, png in figures.items():
        storage.write_bytes(storage.join(output, name), png)
    save_config(config, output, "evaluate")
    log.info("evaluate: accuracy %.4f on %d rows", report["accuracy"], report["rows"])
    summary_keys = (
        "rows",
        "accuracy",
        "macro_f1",
        "majority_class_accuracy",
        "auc",
        "log_loss",
        "calibration_error",
        "model",
        "baseline",
        "true_model",
    )
    summary_keys += ("patients", "macro_auc", "micro_auc", "ece", "thresholds")  # clinical reports (workloads/clinical_metrics.py)
    # After the report is on storage: the training run's MLflow run gets the test metrics and files.
    tracked = tracking.log_evaluation(config, report, output, [REPORT_FILE, "confusion_matrix.json", *figures, "config.evaluate.yaml"])
    return {k: report[k] for k in summary_keys if k in report} | {"output": output, "tracking": tracked}


class ComparisonScorer:
    """Several models over the same rows in one pass: each row is scored by every model, so a
    comparison never depends on which rows a model happened to see."""

    def __init__(self, bundle_uris: list[str]) -> None:
        self.scorers = [PreparedRowScorer(bundle_uri=uri) for uri in bundle_uris]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, scorer in enumerate(self.scorers):
            scored = scorer(batch)
            out["label"] = scored["label"]
            out[f"probabilities_{i}"] = scored["probabilities"]
        return out


def score_models_on_test_split(config: AppConfig, model_uris: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(labels, one probability matrix per model) for the held-out test split, all models scored
    in the same Ray Data run with evaluate's scorer (the promotion gate's comparison)."""
    workload = get_workload(config.workload)
    scored = stateful_map(
        read_split(config.train_data_uri(), "test", workload.training_columns),
        ComparisonScorer,
        {"bundle_uris": model_uris},
        rows=load_manifest(config.train_data_uri()).get("splits", {}).get("test"),
        batch_size=config.evaluate.batch_size,
        max_workers=1,
        batch_format="numpy",
    )
    labels: list[np.ndarray] = []
    probabilities: list[list[np.ndarray]] = [[] for _ in model_uris]
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        labels.append(batch["label"])
        for i in range(len(model_uris)):
            probabilities[i].append(np.stack(batch[f"probabilities_{i}"]))
    if not labels:
        raise ValueError("the test split is empty: prepare with --test-fraction > 0")
    return np.concatenate(labels), [np.concatenate(p) for p in probabilities]
