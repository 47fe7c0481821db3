"""Single-label classification metrics, shared by the workloads' evaluation reports."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def classification_report(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    predicted = probabilities.argmax(axis=1)
    ids = list(range(len(classes)))
    per_class = skm.classification_report(labels, predicted, labels=ids, target_names=classes, output_dict=True, zero_division=0)
    return {
        "rows": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "macro_f1": float(skm.f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)),
        "majority_class_accuracy": float(np.bincount(labels, minlength=len(classes)).max() / max(1, len(labels))),
        "per_class": {name: per_class[name] for name in classes},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=ids).tolist(),
        "classes": classes,
    }
