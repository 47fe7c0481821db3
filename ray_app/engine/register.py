"""register: copy a run's latest checkpoint into the model registry as a new version, with its
metrics, config and data fingerprint, and move an alias (e.g. ``production``) to it."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from ray_app import storage, tracking
from ray_app.config import AppConfig
from ray_app.engine.evaluate import REPORT_FILE
from ray_app.engine.train import latest_checkpoint_uri
from ray_app.prepared import data_fingerprint
from ray_app.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)

# Evaluation entries kept with a version. thresholds: multi-label decision thresholds chosen on the
# validation split at evaluate; they become part of the version (load_bundle hands them to the workload).
REGISTERED_EVALUATION = ("accuracy", "macro_f1", "auc", "log_loss", "rows", "baseline")
REGISTERED_EVALUATION += ("macro_auc", "micro_auc", "ece", "patients", "thresholds", "threshold_rule")


def run_register(config: AppConfig) -> dict[str, Any]:
    checkpoint = latest_checkpoint_uri(config)
    report_uri = storage.join(config.evaluation_uri(), REPORT_FILE)
    evaluation = storage.read_json(report_uri) if storage.exists(report_uri) else None
    bundle_info = storage.read_json(storage.join(checkpoint, "bundle.json"))
    if evaluation is not None:  # a report for other weights must not travel with this model
        check_report_matches(evaluation, report_uri, checkpoint, bundle_info["weights_sha256"], config)
    metadata = {
        "run_name": config.train.run_name,
        "training_metrics": bundle_info["metrics"],
        "evaluation": {k: evaluation[k] for k in REGISTERED_EVALUATION if k in evaluation} if evaluation else None,
        "data": config.train_data_uri(),
        "data_fingerprint": data_fingerprint(config.train_data_uri()),
        "config": config.model_dump(mode="json"),
        # The MLflow run of this training run ({tracking_uri, experiment_id, run_id}), or None.
        "mlflow_run": tracking.recorded_run(config.run_uri()),
    }
    registry = ModelRegistry(config.models_uri())
    alias = config.registration.alias
    gate = promotion_gate(config, registry, checkpoint, bundle_info) if alias else None
    if gate is not None:
        metadata["promotion"] = gate
        if not gate["passed"] and not config.registration.force:
            raise PromotionRefused(refusal_message(config, gate))
    with tempfile.TemporaryDirectory(prefix="ray_app-onnx-") as exports:
        extra_files: dict[str, str] = {}
        if config.registration.onnx:  # refused here, before a number is taken, when ONNX and torch disagree
            from ray_app.onnx_export import export_for_registration

            metadata["onnx"], extra_files = export_for_registration(config, checkpoint, exports)
        version = registry.register(
            config.workload,
            checkpoint,
            metadata,
            alias=alias,
            reason=config.registration.reason or "register",
            metrics=gate,
            extra_files=extra_files,
        )
    summary = {
        "workload": config.workload,
        "version": version,
        "alias": alias,
        "uri": registry.version_uri(config.workload, version),
        "promotion": gate,
    }
    summary["tracking"] = tracking.log_registration(config, version, alias, summary["uri"])
    log.info("register: %s", summary)
    return summary


class ReportMismatch(RegistryError):
    """The evaluation report was computed for other weights than the checkpoint being registered."""


class PromotionRefused(RegistryError):
    """The new model scores worse than the alias's current model (beyond the tolerance)."""


def check_report_matches(report: dict[str, Any], report_uri: str, checkpoint: str, weights_sha256: str, config: AppConfig) -> None:
    evaluated = report.get("weights_sha256")
    if evaluated != weights_sha256:
        what = f"weights {evaluated[:12]}… ({report.get('model')})" if evaluated else "weights it does not name (an older report)"
        raise ReportMismatch(
            f"register: the evaluation report {report_uri} is for {what}, not for the checkpoint being registered "
            f"({checkpoint}, weights {weights_sha256[:12]}…). Nothing was registered. Re-run "
            f"`ray-app {config.workload} evaluate --run-name {config.train.run_name}` on this checkpoint first"
        )


# The metric a new model must not lose on, per workload (RegisterConfig.gate_metric overrides it).
DEFAULT_GATE_METRICS = {"ctr": "auc"}
LOWER_IS_BETTER = {"log_loss", "ece", "brier"}


def gate_metric(config: AppConfig) -> str:
    return config.registration.gate_metric or DEFAULT_GATE_METRICS.get(config.workload, "accuracy")


def promotion_gate(config: AppConfig, registry: ModelRegistry, candidate_uri: str, candidate_info: dict[str, Any]) -> dict[str, Any]:
    """Re-score the candidate and the alias's current model in one run, on the same held-out test
    rows with the same metric, and decide whether the alias may move. Stored reports are never
    compared: they may come from other data or other code."""
    alias, metric, tolerance = config.registration.alias, gate_metric(config), config.registration.gate_tolerance
    decision: dict[str, Any] = {
        "metric": metric,
        "tolerance": tolerance,
        "forced": config.registration.force,
        "candidate": {"uri": candidate_uri, "weights_sha256": candidate_info["weights_sha256"]},
    }
    current_version = registry.aliases(config.workload).get(alias)
    if current_version is None:
        return {**decision, "passed": True, "current": None, "note": f"alias {alias!r} had no model"}
    current_uri = registry.version_uri(config.workload, current_version)
    current_info = storage.read_json(storage.join(current_uri, "bundle.json"))
    decision["current"] = {"version": current_version, "weights_sha256": current_info["weights_sha256"]}
    if current_info["weights_sha256"] == candidate_info["weights_sha256"]:
        return {**decision, "passed": True, "note": "same weights as the current model"}
    classes = candidate_info["manifest"]["classes"]
    if current_info["manifest"]["classes"] != classes:
        note = f"the current model's classes {current_info['manifest']['classes']} differ from the new model's {classes}: no like-for-like score"
        return {**decision, "passed": False, "note": note}

    from ray_app.engine.evaluate import score_models_on_test_split
    from ray_app.workloads import get_workload

    workload = get_workload(config.workload)
    try:
        labels, (candidate_probabilities, current_probabilities) = score_models_on_test_split(config, [candidate_uri, current_uri])
    except Exception as exc:  # noqa: BLE001 - e.g. the current model expects other data shapes: no like-for-like score
        note = f"the two models could not be scored on the same test rows ({type(exc).__name__}: {str(exc)[:300]})"
        return {**decision, "passed": False, "note": note}
    scores = []
    for probabilities in (candidate_probabilities, current_probabilities):
        report, _ = workload.evaluation_report(labels, probabilities, classes)
        if metric not in report or not isinstance(report[metric], int | float):
            numeric = sorted(k for k, v in report.items() if isinstance(v, int | float))
            raise ValueError(f"register: gate metric {metric!r} is not in the {config.workload} report; choose one of {numeric}")
        scores.append(float(report[metric]))
    candidate_score, current_score = scores
    lower_is_better = metric in LOWER_IS_BETTER
    margin = (current_score - candidate_score) if lower_is_better else (candidate_score - current_score)
    decision["candidate"]["score"], decision["current"]["score"] = candidate_score, current_score
    return {
        **decision,
        "passed": margin >= -tolerance,
        "rows": int(len(labels)),
        "split": "test",
        "data": config.train_data_uri(),
        "higher_is_better": not lower_is_better,
    }


def refusal_message(config: AppConfig, gate: dict[str, Any]) -> str:
    alias, current = config.registration.alias, gate["current"]
    if "score" in gate["candidate"]:
        why = (
            f"it scores {gate['metric']} {gate['candidate']['score']:.4f} against {current['score']:.4f} for version "
            f"{current['version']} (tolerance {gate['tolerance']}), both re-scored now on the same {gate['rows']} test rows of {gate['data']}"
        )
    else:
        why = gate["note"]
    return f"register: refusing to move {alias!r} to this run's model: {why}. Nothing was registered. Use --force to move it anyway"
