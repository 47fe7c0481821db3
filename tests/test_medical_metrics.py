"""Clinical evaluation maths: AUC, patient bootstrap, thresholds, calibration; no Ray."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ray_app.workloads.clinical_metrics import bootstrap_auc_ci, choose_threshold, clinical_report, expected_calibration_error, fast_auc


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.25, 400), 0, 1)
    return y, score


def test_fast_auc_matches_sklearn_with_ties(scored):
    y, score = scored
    rounded = np.round(score, 1)  # plenty of ties
    assert fast_auc(y, rounded) == pytest.approx(roc_auc_score(y, rounded))
    assert np.isnan(fast_auc(np.zeros(5), np.arange(5.0)))


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_clustered_data(scored):
    # Five copies of each image under one patient: resampling images pretends there are 5x as
    # many independent cases and gives a falsely narrow interval; resampling patients does not.
    y, score = scored
    truth, scores = np.repeat(y, 5)[:, None], np.repeat(score, 5)[:, None]
    patients = np.repeat(np.arange(len(y)).astype(str), 5)
    lo_p, hi_p, n_p = bootstrap_auc_ci(truth, scores, patients, draws=300)
    lo_i, hi_i, n_i = bootstrap_auc_ci(truth, scores, None, draws=300)
    assert n_p == len(y) and n_i == 5 * len(y)
    point = fast_auc(truth[:, 0], scores[:, 0])
    assert lo_p[0] < point < hi_p[0]
    assert (hi_p[0] - lo_p[0]) > 1.8 * (hi_i[0] - lo_i[0])


def test_threshold_rules(scored):
    y, score = scored
    youden = choose_threshold(y, score, "youden")
    assert 0 < youden < 1
    t90 = choose_threshold(y, score, "sensitivity:0.9")
    sensitivity = lambda t: ((score >= t) & (y == 1)).sum() / y.sum()  # noqa: E731
    specificity = lambda t: ((score < t) & (y == 0)).sum() / (y == 0).sum()  # noqa: E731
    assert sensitivity(t90) >= 0.9
    # The highest such threshold: the next score above it misses the target.
    assert sensitivity(np.min(score[score > t90])) < 0.9
    s95 = choose_threshold(y, score, "specificity:0.95")
    assert specificity(s95) >= 0.95 and specificity(np.max(score[score < s95])) < 0.95  # the lowest one keeping it
    assert s95 > youden > t90  # rule-in above the balanced point, screening below it
    for bad in ("vibes", "sensitivity:1.5", "specificity:0"):
        with pytest.raises(ValueError, match="threshold rule must be"):
            choose_threshold(y, score, bad)


def test_threshold_rule_is_an_evaluate_option():
    from ray_app.workloads.base import OptionConflict
    from ray_app.workloads.image import ImageOptions, ImageWorkload

    assert ImageOptions().threshold_rule == "youden"
    assert ImageOptions(threshold_rule="Sensitivity:0.95").threshold_rule == "sensitivity:0.95"
    with pytest.raises(ValueError, match="threshold rule must be"):
        ImageOptions(threshold_rule="sensitivity")
    workload, recorded = ImageWorkload(), ImageOptions().model_dump()
    given = {"threshold_rule": "specificity:0.9"}
    assert workload.resolve_options("evaluate", given, recorded).threshold_rule == "specificity:0.9"
    with pytest.raises(OptionConflict, match="no effect at prepare"):
        workload.resolve_options("prepare", given, None)


def test_ece_separates_calibrated_from_overconfident():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)
    calibrated, _ = expected_calibration_error(y[:, None], p[:, None], multilabel=True)
    overconfident, bins = expected_calibration_error(y[:, None], np.where(p > 0.5, 0.99, 0.01)[:, None], multilabel=True)
    assert calibrated < 0.02 < 0.2 < overconfident
    assert sum(b["n"] for b in bins) == 20000


def test_multilabel_report_has_everything_a_clinician_reads(scored):
    y, score = scored
    rng = np.random.default_rng(2)
    labels = np.stack([y, 1 - y, rng.integers(0, 2, len(y))], axis=1).astype(np.float32)
    probabilities = np.stack([score, 1 - score, rng.uniform(0, 1, len(y))], axis=1)
    groups = (np.arange(len(y)) // 3).astype(str)
    report, figures = clinical_report(labels, probabilities, ["A", "B", "C"], groups=groups, validation=(labels, probabilities), draws=1000)
    assert report["task"] == "multilabel" and report["patients"] == len(set(groups))
    assert report["bootstrap"] == {"draws": 1000, "unit": "patient", "interval": "95% percentile"}
    for name in ("A", "B"):
        finding = report["per_class"][name]
        assert finding["auc"] > 0.8 and finding["auc_ci95"][0] < finding["auc"] < finding["auc_ci95"][1]
        assert 0 <= finding["sensitivity"] <= 1 and 0 <= finding["specificity"] <= 1
    assert 0.35 < report["per_class"]["C"]["auc"] < 0.65  # noise stays at chance
    assert report["macro_auc"] == pytest.approx(np.mean([report["per_class"][c]["auc"] for c in "ABC"]))
    assert "youden" in report["threshold_rule"] and set(report["thresholds"]) == {"A", "B", "C"}
    assert 0 <= report["ece"] <= 1
    for name in ("roc_curves.png", "reliability.png"):
        assert figures[name].startswith(b"\x89PNG")
