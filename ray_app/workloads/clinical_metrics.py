"""Evaluation a clinician would read, for single-label classes and multi-label findings alike:
per-class ROC AUC with 95% bootstrap confidence intervals that resample *patients* (all images
of a drawn patient come together: images of one patient are not independent), average precision,
macro and micro AUC, sensitivity and specificity at a decision threshold chosen on the validation
split by a named rule, calibration (ECE + reliability plot) and ROC curves as PNG.

Threshold rules (``--threshold-rule`` at evaluate): ``youden`` (max sensitivity + specificity - 1,
the default), ``sensitivity:0.95`` (the highest threshold that reaches that sensitivity on the
validation split: a screening test that must not miss) or ``specificity:0.95`` (the lowest
threshold that keeps that specificity: a rule-in test that must not over-call).

scipy and scikit-learn are imported where used: ``parse_threshold_rule`` validates the image
workload's options, which decode actors build too, and they should not pay ~1 s of imports.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

BOOTSTRAP_DRAWS = 1000
CALIBRATION_BINS = 10
THRESHOLD_RULE = re.compile(r"youden|(sensitivity|specificity):(0?\.\d+|1(\.0*)?)")


def parse_threshold_rule(rule: str) -> str:
    """``youden``, ``sensitivity:<target>`` or ``specificity:<target>`` (target in (0, 1])."""
    rule = str(rule).strip().lower()
    if not THRESHOLD_RULE.fullmatch(rule) or (rule != "youden" and float(rule.split(":")[1]) <= 0):
        raise ValueError(f"threshold rule must be 'youden', 'sensitivity:<0..1>' or 'specificity:<0..1>'; got {rule!r}")
    return rule


def fast_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann–Whitney rank sum (ties averaged): ~50x cheaper than sklearn per call,
    which matters for 1,000 bootstrap draws × every class."""
    from scipy.stats import rankdata

    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y > 0].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices -> indicator matrix; multi-hot matrices pass through."""
    if labels.ndim == 2:
        return (labels > 0.5).astype(np.int8)
    out = np.zeros((len(labels), n_classes), np.int8)
    out[np.arange(len(labels)), labels.astype(np.int64)] = 1
    return out


def _group_rows(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Row indices per patient; a row without a patient is its own group."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    keys = [g if g not in (None, "") else f"row:{i}" for i, g in enumerate(groups)]
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def bootstrap_auc_ci(
    truth: np.ndarray, scores: np.ndarray, groups: np.ndarray | None, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """95% percentile intervals of per-class AUC from ``draws`` resamples of patients (with
    replacement). Returns (low, high, number of patients)."""
    rng = np.random.default_rng(seed)
    rows = _group_rows(groups, len(truth))
    n_classes = truth.shape[1]
    samples = np.full((draws, n_classes), np.nan)
    for d in range(draws):
        picked = np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])
        for c in range(n_classes):
            samples[d, c] = fast_auc(truth[picked, c], scores[picked, c])
    with np.errstate(all="ignore"):
        low = np.nanpercentile(samples, 2.5, axis=0) if draws else np.full(n_classes, np.nan)
        high = np.nanpercentile(samples, 97.5, axis=0) if draws else np.full(n_classes, np.nan)
    return low, high, len(rows)


def choose_threshold(y: np.ndarray, score: np.ndarray, rule: str) -> float:
    from sklearn import metrics as skm

    rule = parse_threshold_rule(rule)
    if y.sum() == 0 or y.sum() == len(y):
        return 0.5
    # Every operating point (no collinear points dropped): a specificity target may fall on one.
    fpr, tpr, thresholds = skm.roc_curve(y, score, drop_intermediate=False)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # sklearn's first threshold is +inf
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    kind, target = rule.split(":")
    if kind == "sensitivity":  # thresholds fall along the curve: the first point reaching it is the highest threshold
        reaching = np.flatnonzero(tpr >= float(target) - 1e-12)
        return float(thresholds[reaching[0]]) if len(reaching) else float(thresholds[-1])
    keeping = np.flatnonzero(1.0 - fpr >= float(target) - 1e-12)  # specificity: the last point keeping it
    return float(thresholds[keeping[-1]])


def expected_calibration_error(
    truth: np.ndarray, probabilities: np.ndarray, multilabel: bool, bins: int = CALIBRATION_BINS
) -> tuple[float, list[dict]]:
    """ECE over equal-width bins, with the bins for a reliability plot. ``truth`` is the indicator
    matrix. Multi-label: every (image, finding) probability is a prediction; single-label: the
    top class's confidence against whether it was right."""
    if multilabel:
        confidence, correct = probabilities.ravel(), truth.ravel().astype(float)
    else:
        confidence, correct = probabilities.max(axis=1), (probabilities.argmax(axis=1) == truth.argmax(axis=1)).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        mask = index == b
        if mask.any():
            gap = abs(confidence[mask].mean() - correct[mask].mean())
            ece += mask.mean() * gap
            table.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "n": int(mask.sum()),
                          "confidence": float(confidence[mask].mean()), "observed": float(correct[mask].mean())})  # fmt: skip
    return float(ece), table


def clinical_report(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    threshold_rule: str = "youden",
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    from sklearn import metrics as skm

    multilabel = labels.ndim == 2
    truth = one_hot(labels, len(classes))
    n_classes = len(classes)
    if validation is not None:
        val_truth = one_hot(validation[0], n_classes)
        thresholds = [choose_threshold(val_truth[:, c], validation[1][:, c], threshold_rule) for c in range(n_classes)]
        rule = f"{threshold_rule} on the validation split ({len(val_truth)} rows)"
    else:
        thresholds, rule = [0.5] * n_classes, "fixed 0.5 (no validation scores)"
    low, high, patients = bootstrap_auc_ci(truth, probabilities, groups, draws, seed)
    per_class, aucs = {}, []
    for c, name in enumerate(classes):
        y, p = truth[:, c], probabilities[:, c]
        auc = fast_auc(y, p)
        aucs.append(auc)
        predicted = p >= thresholds[c]
        positives, negatives = int(y.sum()), int(len(y) - y.sum())
        per_class[name] = {
            "auc": auc,
            "auc_ci95": [float(low[c]), float(high[c])],
            "average_precision": float(skm.average_precision_score(y, p)) if positives else float("nan"),
            "threshold": float(thresholds[c]),
            "sensitivity": float((predicted & (y > 0)).sum() / positives) if positives else float("nan"),
            "specificity": float((~predicted & (y == 0)).sum() / negatives) if negatives else float("nan"),
            "positives": positives,
            "prevalence": float(positives / max(1, len(y))),
        }
    ece, reliability = expected_calibration_error(truth, probabilities, multilabel)
    valid = [a for a in aucs if not np.isnan(a)]
    report: dict[str, Any] = {
        "rows": int(len(labels)),
        "patients": patients,
        "task": "multilabel" if multilabel else "multiclass",
        "macro_auc": float(np.mean(valid)) if valid else float("nan"),
        "micro_auc": fast_auc(truth.ravel(), probabilities.ravel()),
        "per_class": per_class,
        "threshold_rule": rule,
        "thresholds": dict(zip(classes, [float(t) for t in thresholds], strict=True)),
        "bootstrap": {"draws": draws, "unit": "patient" if groups is not None else "image", "interval": "95% percentile"},
        "ece": ece,
        "reliability": reliability,
        "classes": classes,
    }
    report["auc"] = report["macro_auc"]
    if multilabel:
        predicted = probabilities >= np.asarray(thresholds)
        report["accuracy"] = float((predicted == (truth > 0)).all(axis=1).mean())  # exact match
        report["majority_class_accuracy"] = float((truth.sum(axis=1) == 0).mean())  # all-negative answer
    else:
        from ray_app.workloads.classification import classification_report

        report = {**classification_report(labels, probabilities, classes), **report}
    return report, {
        "roc_curves.png": roc_curves_png(truth, probabilities, classes, per_class),
        "reliability.png": reliability_png(reliability, ece),
    }


def roc_curves_png(truth: np.ndarray, probabilities: np.ndarray, classes: list[str], per_class: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure
    from sklearn import metrics as skm

    from ray_app.plots import _png

    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for c, name in enumerate(classes):
        if 0 < truth[:, c].sum() < len(truth):
            fpr, tpr, _ = skm.roc_curve(truth[:, c], probabilities[:, c])
            lo, hi = per_class[name]["auc_ci95"]
            ax.plot(fpr, tpr, label=f"{name}: {per_class[name]['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (AUC, 95% CI by patient bootstrap)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def reliability_png(reliability: list[dict], ece: float) -> bytes:
    from matplotlib.figure import Figure

    from ray_app.plots import _png

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.plot([b["confidence"] for b in reliability], [b["observed"] for b in reliability], marker="o")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=f"reliability (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    return _png(fig)
