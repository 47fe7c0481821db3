"""NLP workload on real Rotten Tomatoes snippets: the CLI chain, tokenizer-once-per-actor, batch
predict, and the HTTP endpoint's validation. (Resume by run name: test_training_recovery.)"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import ray
import requests
from conftest import REVIEWS
from ray import serve

from ray_app.cli import run_cli
from ray_app.demos.data import write_text_demo
from ray_app.workloads.text import TextPreparer, packaged_minilm_dir, verify_weights

PREDICT_REVIEWS = 60


def test_prepare_rejects_bad_rows_with_reasons(text_run):
    prepared = text_run["prepared"]
    assert prepared["rows_in"] == REVIEWS + 3
    assert (prepared["rows_ok"], prepared["rows_rejected"]) == (REVIEWS, 3)
    reasons = sorted(pq.read_table(prepared["rejects"]).column("reject_reason").to_pylist())
    assert reasons == ["missing label", "missing or empty text", "unknown label 'plot'"]


def test_fine_tuned_model_beats_majority_class_and_reports_the_baseline(text_run):
    assert text_run["trained"]["epochs_completed"] == 2
    evaluated = text_run["evaluated"]
    assert evaluated["accuracy"] > evaluated["majority_class_accuracy"] + 0.05, evaluated
    baseline = evaluated["baseline"]
    assert baseline["train_rows"] > 0 and 0.5 < baseline["accuracy"] <= 1


def test_tokenizer_loads_once_per_actor_not_per_batch(ray_session):
    @ray.remote
    class Counter:
        def __init__(self) -> None:
            self.loads = 0

        def add(self) -> None:
            self.loads += 1

        def value(self) -> int:
            return self.loads

    counter = Counter.options(name="tokenizer_loads").remote()

    class CountingPreparer(TextPreparer):
        def load_tokenizer(self):
            ray.get(ray.get_actor("tokenizer_loads").add.remote())
            return super().load_tokenizer()

    rows = [{"text": f"review number {i} was fine", "label": "fresh"} for i in range(400)]
    manifest = {"classes": ["fresh", "rotten"], "split_fractions": [0.1, 0.1]}
    out = (
        ray.data.from_items(rows, override_num_blocks=20)
        .map_batches(
            CountingPreparer,
            fn_constructor_kwargs={"options": {"max_length": 32}, "manifest": manifest},
            batch_size=10,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=2),
        )
        .take_all()
    )
    assert len(out) == 400  # 40 batches ...
    assert ray.get(counter.value.remote()) == 2  # ... but one tokenizer load per actor


def test_batch_predict_classifies_every_row(text_run, tmp_path):
    """On a slice of the reviews (+ the same broken rows): every row is scored or rejected."""
    csv, output = str(tmp_path / "to_predict.csv"), str(tmp_path / "predictions")
    write_text_demo(csv, limit=PREDICT_REVIEWS)
    summary = run_cli(["text", "predict", *text_run["common"], "--input", csv, "--output", output, "--model", "production"])
    assert summary["rows_in"] == PREDICT_REVIEWS + 3
    assert summary["rows_rejected"] == 1  # the empty text; labels are not needed to predict
    ok = pq.read_table(os.path.join(output, "status=ok")).to_pylist()
    assert len(ok) == summary["rows_ok"] and {r["label"] for r in ok} <= {"fresh", "rotten"}
    assert all(0.5 <= r["probability"] <= 1 and r["id"] for r in ok)


def test_weights_with_the_wrong_hash_are_refused():
    with pytest.raises(ValueError, match="SHA-256"):
        verify_weights(packaged_minilm_dir(), "0" * 64)


@pytest.fixture(scope="module")
def text_endpoint(text_run, start_endpoint):
    yield start_endpoint("text", text_run["common"][1], max_replicas=1, max_items_per_request=8)
    serve.delete("text")


def test_endpoint_labels_texts_and_flags_truncation(text_endpoint):
    texts = ["A moving, beautifully acted film.", "Dull, lifeless and far too long. " * 40]
    answer = requests.post(text_endpoint, json={"texts": texts}, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["truncated"] for r in results] == [False, True]
    assert all(r["label"] in {"fresh", "rotten"} and 0.5 <= r["score"] <= 1 for r in results)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["fine", ""]}, "texts.1: empty string"),
        ({"texts": ["fine", 3]}, "texts.1"),
        ({"texts": ["x"] * 9}, "at most 8"),
        ({"text": ["wrong field"]}, "texts"),
        ("not json at all", "body"),
    ],
)
def test_bad_requests_get_422_and_the_replica_keeps_serving(text_endpoint, body, words):
    data = body if isinstance(body, str) else json.dumps(body)
    answer = requests.post(text_endpoint, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["error"]["message"]
    assert requests.post(text_endpoint, json={"texts": ["still serving"]}, timeout=60).status_code == 200
