"""Click prediction on real MovieLens-100K clicks and the synthetic Criteo generator: transform
parity between training and serving, the CLI chain against the per-item baseline, and the
scale-to-zero endpoint."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import requests
from conftest import ROWS
from ray import serve

from ray_app import warm_workers
from ray_app.demos.clicks import CATEGORICAL, MOVIELENS_OPTIONS, NUMERIC, generate_block, generate_criteo
from ray_app.workloads.ctr import CTRWorkload


def test_prepare_rejects_malformed_rows_and_splits_by_time(ctr_run):
    prepared = ctr_run["prepared"]
    assert prepared["rows_in"] == ROWS + 3
    assert prepared["rows_ok"] + prepared["rows_rejected"] == prepared["rows_in"]
    rejects = {r["id"]: r["reject_reason"] for r in pq.read_table(prepared["rejects"]).to_pylist()}
    assert rejects["bad-label"] == "missing label"
    assert rejects["bad-age"].startswith("age: not a finite number")
    assert rejects["bad-nan"].startswith("age:")
    ok = pq.read_table(os.path.join(prepared["output"], "status=ok")).to_pandas()
    times = ctr_run["frame"].set_index("event_id")["timestamp"]
    ok["timestamp"] = ok["id"].map(times)
    # No leakage from the future: every training event precedes every test event.
    assert ok.loc[ok.split == "train", "timestamp"].max() <= ok.loc[ok.split == "test", "timestamp"].min()


def test_served_transform_equals_training_transform(ctr_run):
    """The features the endpoint computes for an event are the ones training saw for it."""
    prepared = ctr_run["prepared"]
    manifest = json.load(open(os.path.join(prepared["output"], "manifest.json")))
    ok = pq.read_table(os.path.join(prepared["output"], "status=ok")).to_pandas().set_index("id")
    sample = ctr_run["frame"].sample(50, random_state=0)
    workload = CTRWorkload()
    options = workload.parse_options(MOVIELENS_OPTIONS)
    events = sample.drop(columns=["click"]).to_dict("records")
    decoded = workload.decode_request(json.dumps({"events": events}).encode(), options, manifest)
    for event, ((categorical, numeric), _) in zip(events, decoded, strict=True):
        row = ok.loc[event["event_id"]]
        np.testing.assert_array_equal(categorical, row["categorical"])
        np.testing.assert_array_equal(numeric, row["numeric"])


def test_model_beats_per_item_baseline(ctr_run):
    evaluated = ctr_run["evaluated"]
    assert evaluated["auc"] > evaluated["baseline"]["auc"], evaluated
    assert evaluated["auc"] > 0.6
    report_dir = evaluated["output"]
    assert os.path.getsize(os.path.join(report_dir, "calibration.png")) > 0
    report = json.load(open(os.path.join(report_dir, "report.json")))
    assert sum(b["rows"] for b in report["calibration"]) == report["rows"]


def test_generator_has_criteo_schema_and_known_auc(ray_session, tmp_path):
    first = generate_criteo(str(tmp_path / "a"), rows=20_000, seed=3, rows_per_block=5_000)
    generate_criteo(str(tmp_path / "b"), rows=20_000, seed=3, rows_per_block=5_000)
    a = pq.read_table(first["output"]).to_pandas().sort_values("timestamp").reset_index(drop=True)
    b = pq.read_table(str(tmp_path / "b")).to_pandas().sort_values("timestamp").reset_index(drop=True)
    assert len(a) == 20_000
    assert set(a.columns) == {"event_id", "timestamp", "click", "true_probability", *NUMERIC, *CATEGORICAL}
    assert all(pd.api.types.is_float_dtype(a[c]) for c in NUMERIC) and all(a[c].map(type).eq(str).all() for c in CATEGORICAL)
    pd.testing.assert_frame_equal(a, b)  # same seed, same data
    from sklearn.metrics import roc_auc_score

    true_auc = roc_auc_score(a["click"], a["true_probability"])
    assert 0.7 < true_auc < 0.9
    assert abs(a["click"].mean() - a["true_probability"].mean()) < 0.02


def test_behaviour_generator_adds_the_known_term_to_the_static_truth():
    """The behavioural benchmark splits AUC into the signal's share and the static fields' share:
    that needs the truth without the term, and the term exactly as documented."""
    block = generate_block({"id": np.arange(4_000)}, seed=5, behaviour_effect=1.0)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    term = logit(block["true_probability"]) - logit(block["true_static_probability"])
    clicks, events = block.groupby("user_id")["click"].cumsum() - block["click"], block.groupby("user_id").cumcount()
    np.testing.assert_allclose(term, 5.0 * ((clicks + 1) / (events + 2) - 0.25), atol=1e-9)
    assert block["user_id"].nunique() < len(block) / 10  # users come back: there is a history to learn from


@pytest.fixture(scope="module")
def ctr_endpoint(ctr_run, start_endpoint):
    yield start_endpoint("ctr", ctr_run["common"][1], min_replicas=0, max_replicas=2, downscale_delay_s=2)
    serve.delete("ctr")


def _running_replicas() -> int:
    deployment = serve.status().applications["ctr"].deployments["ctr-model"]
    return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def _wait_for_replicas(count: int, timeout: float = 90) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _running_replicas() == count:
            return True
        time.sleep(0.5)
    return False


@ray.remote(num_cpus=0)
class SpareTaker:
    """Holds an idle pool worker, as any other job's actor or task may."""

    def ready(self) -> bool:
        return True


def test_endpoint_scales_from_zero_answers_and_returns_to_zero(ctr_endpoint, ctr_run):
    # The session serves, so its node keeps a spare worker (ray_app.warm_workers). Other work takes
    # the spares there are; the gateway, whose model can scale to zero, must ask for a new one.
    raylet = warm_workers.local_raylet()
    takers = []
    while warm_workers.spares_of(raylet):
        takers.append(SpareTaker.remote())
        ray.get(takers[-1].ready.remote())
    assert _wait_for_replicas(0), "no replica should run while idle"
    deadline = time.time() + 30
    while not warm_workers.spares_of(raylet, started_only=True) and time.time() < deadline:
        time.sleep(0.25)
    for taker in takers:
        ray.kill(taker)
    assert warm_workers.spares_of(raylet, started_only=True), "the gateway did not replace the spare"
    # The replica that wakes up must start on it, with Serve and our code imported.
    event = ctr_run["frame"].drop(columns=["click"]).iloc[10].to_dict()
    answer = requests.post(ctr_endpoint, json=event, timeout=120)
    assert answer.status_code == 200, answer.text
    (probability,) = answer.json()["click_probability"]
    assert 0 < probability < 1
    assert _running_replicas() >= 1
    assert serve.get_deployment_handle("ctr-model", app_name="ctr").ready.remote().result()["warm_start"] is True
    assert _wait_for_replicas(0), "replicas should go back to zero after the idle delay"


def test_events_in_a_list_and_unknown_categories(ctr_endpoint, ctr_run):
    events = ctr_run["frame"].drop(columns=["click"]).iloc[:3].to_dict("records")
    events[0]["item_id"] = "never-seen-item"  # hashed into a bucket like any other value
    answer = requests.post(ctr_endpoint, json={"events": events}, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["click_probability"]) == 3


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"age": None}, "age"),
        ({"age": "old"}, "age"),
        ({"release_year": math.inf}, "release_year"),
        ({"genre": 3.5}, "genre"),
    ],
)
def test_bad_events_get_422_naming_the_field(ctr_endpoint, ctr_run, change, words):
    event = {**ctr_run["frame"].drop(columns=["click"]).iloc[5].to_dict(), **change}
    if change.get("age", 0) is None:
        del event["age"]
    answer = requests.post(ctr_endpoint, data=json.dumps(event), headers={"Content-Type": "application/json"}, timeout=120)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["error"]["message"]


def test_nan_literal_is_rejected(ctr_endpoint, ctr_run):
    event = ctr_run["frame"].drop(columns=["click"]).iloc[5].to_dict()
    body = json.dumps(event).replace(f'"age": {event["age"]}', '"age": NaN')
    answer = requests.post(ctr_endpoint, data=body, headers={"Content-Type": "application/json"}, timeout=120)
    assert answer.status_code == 422 and "age" in answer.json()["error"]["message"]
