"""Click-model evaluation: AUC, log-loss, calibration, and the baselines computed in the same run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
from sklearn.metrics import log_loss, roc_auc_score

from ray_app import plots, storage
from ray_app.prepared import ok_uri


def calibration(labels: np.ndarray, predicted: np.ndarray, buckets: int = 10) -> list[dict[str, float]]:
    """Predicted vs observed click rate per equal-count bucket of predictions."""
    order = np.argsort(predicted)
    rows = []
    for chunk in np.array_split(order, min(buckets, len(order))):
        if len(chunk):
            rows.append({"rows": int(len(chunk)), "predicted": float(predicted[chunk].mean()), "observed": float(labels[chunk].mean())})
    return rows


def calibration_error(buckets: list[dict[str, float]]) -> float:
    """Expected calibration error: the row-weighted mean |predicted - observed| over the buckets.
    Steadier than the worst bucket's gap, which one bucket's few rows can move."""
    rows = sum(b["rows"] for b in buckets)
    return float(sum(b["rows"] * abs(b["predicted"] - b["observed"]) for b in buckets) / rows) if rows else float("nan")


def click_report(labels: np.ndarray, predicted: np.ndarray) -> tuple[dict[str, Any], dict[str, bytes]]:
    both = len(np.unique(labels)) == 2
    buckets = calibration(labels, predicted)
    report = {
        "rows": int(len(labels)),
        "auc": float(roc_auc_score(labels, predicted)) if both else None,
        "log_loss": float(log_loss(labels, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "click_rate": float(labels.mean()),
        "mean_prediction": float(predicted.mean()),
        "accuracy": float(((predicted >= 0.5) == labels).mean()),
        "majority_class_accuracy": float(max(labels.mean(), 1 - labels.mean())),
        "calibration": buckets,
        "calibration_error": calibration_error(buckets),
    }
    return report, {"calibration.png": plots.calibration(buckets)}


def _ok_dataset(prepared_uri: str) -> pads.Dataset:
    fs, path = storage.resolve(ok_uri(prepared_uri))  # the published version, not a fixed folder
    return pads.dataset(path, filesystem=fs, format="parquet")


def item_rate_baseline(prepared_uri: str, smoothing: float = 20.0) -> dict[str, Any]:
    """Each item's smoothed click rate in the training window, as the prediction on the test window."""
    data = _ok_dataset(prepared_uri)
    train = data.to_table(columns=["item", "label"], filter=pc.field("split") == "train").to_pandas()
    test = data.to_table(columns=["item", "label"], filter=pc.field("split") == "test").to_pandas()
    prior = train["label"].mean()
    stats = train.groupby("item")["label"].agg(["sum", "count"])
    rate = (stats["sum"] + smoothing * prior) / (stats["count"] + smoothing)
    predicted = test["item"].map(rate).fillna(prior).to_numpy()
    labels = test["label"].to_numpy()
    return {
        "name": "per-item click rate (smoothed) from the training window",
        "auc": float(roc_auc_score(labels, predicted)) if len(np.unique(labels)) == 2 else None,
        "log_loss": float(log_loss(labels, np.clip(predicted, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "calibration": calibration(labels, predicted),
    }


def true_model_auc(prepared_uri: str) -> dict[str, Any] | None:
    """For synthetic data with known click probabilities: the best AUC any model could reach."""
    data = _ok_dataset(prepared_uri)
    test = data.to_table(columns=["label", "true_probability"], filter=pc.field("split") == "test")
    truth = test["true_probability"].to_numpy(zero_copy_only=False)
    if test.num_rows == 0 or np.isnan(truth.astype(float)).all():
        return None
    labels = test["label"].to_numpy()
    return {"auc": float(roc_auc_score(labels, truth)), "log_loss": float(log_loss(labels, np.clip(truth, 1e-7, 1 - 1e-7), labels=[0, 1]))}
