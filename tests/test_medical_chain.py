"""A hospital-style DICOM study set end to end, in one Ray session: prepare (label manifest,
patient split, hashed paths) -> train -> evaluate (patient bootstrap, thresholds on validation)
-> register -> batch predict -> a DICOM file posted to the endpoint, raw and multipart. No
patient name, birth date or raw patient id may appear in anything the pipeline writes."""

from __future__ import annotations

import collections
import json
import os

import pyarrow.parquet as pq
import pytest
import requests
from ray import serve

from ray_app.bundle import load_bundle
from ray_app.cli import run_cli
from ray_app.demos.medical_data import write_study_set
from ray_app.registry import ModelRegistry

IMAGES = 240
# What the study set writes into the files and folder names: none of it may leave the pipeline.
IDENTIFYING = ("Doe", "Patient1", "Lestrade", "PAT0", "PATUNLISTED", "19700101", "Broken^Case")


@pytest.fixture(scope="module")
def medical(ray_session, tmp_path_factory, chain) -> dict:
    folder = tmp_path_factory.mktemp("medical")
    counts = write_study_set(str(folder / "study"), images=IMAGES)
    workspace = str(folder / "ws")
    manifest = str(folder / "study" / "labels.csv")
    common = ["--workspace", workspace]
    prepared = run_cli(
        [
            "image",
            "prepare",
            *common,
            "--input",
            str(folder / "study" / "dicom"),
            "--labels-manifest",
            manifest,
            "--hash-paths",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.25",
        ]  # fmt: skip
    )
    rest = chain("image", workspace, "med", "--epochs", "3", "--batch-size", "16", "--lr", "0.003")
    return {"folder": folder, "counts": counts, "workspace": workspace, "prepared": prepared, **rest}


def _prepared_rows(root: str) -> list[dict]:
    rows = []
    for status in ("ok", "rejected"):
        table = pq.read_table(os.path.join(root, f"status={status}"), columns=["path", "split", "patient", "reject_reason"])
        rows += [{**row, "status": status} for row in table.to_pylist()]
    return rows


def test_prepare_matches_the_manifest_and_counts_the_gaps(medical):
    prepared, counts = medical["prepared"], medical["counts"]
    assert prepared["rows_in"] == counts["images"] + counts["broken_files"] + counts["files_without_row"]
    assert prepared["rows_ok"] == counts["images"]
    reasons = prepared["reject_reasons"]
    assert reasons["no row in the labels manifest for this file"] == 1
    assert (
        reasons["non-image SOP class"] == 1
        and reasons["empty file"] == 1
        and reasons["cannot decode DICOM pixel data (Explicit VR Little Endian)"] == 1
    )
    manifest = json.load(open(os.path.join(medical["prepared"]["output"], "manifest.json")))
    assert manifest["task"] == "multilabel" and manifest["classes"] == ["Effusion", "Nodule", "Opacity"]
    assert manifest["label_manifest"]["rows_missing_file"] == counts["rows_without_file"] == 2
    assert manifest["label_manifest"]["files_without_row"] == 1
    assert manifest["options"]["window"] == ["file"]


def test_no_patient_spans_two_splits(medical):
    rows = [r for r in _prepared_rows(medical["prepared"]["output"]) if r["status"] == "ok"]
    splits = collections.defaultdict(set)
    for row in rows:
        assert row["patient"] and row["patient"].startswith("p-")
        splits[row["patient"]].add(row["split"])
    assert len(splits) >= 40 and all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "val", "test"}
    # Rows are keyed by SOPInstanceUID (from the file), rejects by a salted hash of the path.
    uids = {line.split(",")[1] for line in open(os.path.join(medical["folder"], "study", "labels.csv")).read().splitlines()[1:]}
    not_keyed_by_uid = [(row["path"], row["split"]) for row in rows if row["path"] not in uids]
    assert not not_keyed_by_uid, not_keyed_by_uid[:5]
    assert all(r["path"].startswith("f-") for r in _prepared_rows(medical["prepared"]["output"]) if r["status"] != "ok")


def test_evaluation_has_patient_bootstrap_cis_thresholds_and_plots(medical):
    evaluated = medical["evaluated"]
    report = json.load(open(os.path.join(evaluated["output"], "report.json")))
    assert report["task"] == "multilabel" and report["bootstrap"]["unit"] == "patient" and report["bootstrap"]["draws"] >= 1000
    assert "youden on the validation split" in report["threshold_rule"]
    for name in ("Effusion", "Nodule", "Opacity"):
        finding = report["per_class"][name]
        assert finding["auc_ci95"][0] <= finding["auc"] <= finding["auc_ci95"][1]
        assert 0 <= finding["sensitivity"] <= 1 and 0 <= finding["specificity"] <= 1
    assert report["macro_auc"] > 0.7, report["per_class"]  # the findings follow the digit: learnable
    for png in ("roc_curves.png", "reliability.png"):
        assert open(os.path.join(evaluated["output"], png), "rb").read(4) == b"\x89PNG"
    # The thresholds chosen at evaluate travel with the registered version.
    registry = ModelRegistry(os.path.join(medical["workspace"], "models"))
    bundle = load_bundle(registry.version_uri("image", medical["registered"]["version"]))
    assert bundle.manifest["decision_thresholds"]["thresholds"] == report["thresholds"]


def test_batch_predict_and_the_endpoint_answer_dicom_with_findings(medical, start_endpoint, tmp_path):
    study = os.path.join(medical["folder"], "study", "dicom")
    output = str(tmp_path / "predictions")
    summary = run_cli(["image", "predict", "--workspace", medical["workspace"], "--input", study, "--output", output,
                       "--model", "production", "--hash-paths", "--set", "serve.top_k=3"])  # fmt: skip
    assert summary["rows_ok"] == medical["counts"]["images"] + 1  # + the unlisted (valid) file
    ok = pq.read_table(os.path.join(output, "status=ok")).to_pylist()
    assert all(set(row["findings"]) <= {"Effusion", "Nodule", "Opacity"} for row in ok)
    assert all(len(row["top_probabilities"]) == 3 for row in ok)

    endpoint = start_endpoint("image", medical["workspace"], min_replicas=1, max_replicas=1)
    try:
        name = sorted(os.listdir(os.path.join(study, "Doe_Patient1")))[0]  # "0.dcm" or "0": some files have no suffix
        path = os.path.join(study, "Doe_Patient1", name)
        data = open(path, "rb").read()
        raw = requests.post(endpoint, data=data, timeout=60)
        assert raw.status_code == 200, raw.text
        form = requests.post(endpoint, files={"file": ("scan.dcm", data, "application/dicom")}, timeout=60)
        assert form.status_code == 200 and form.json()["probabilities"] == raw.json()["probabilities"]
        assert set(raw.json()["findings"]) <= {"Effusion", "Nodule", "Opacity"}
        plan = os.path.join(study, "Broken^Case", "plan.dcm")
        refused = requests.post(endpoint, data=open(plan, "rb").read(), timeout=60)
        assert refused.status_code == 422 and "non-image SOP class" in refused.text
        # The first training image of each patient, scored in batch and online, agree.
        by_uid = {row["path"]: row for row in ok}
        uid = next(
            line.split(",")[1]
            for line in open(os.path.join(medical["folder"], "study", "labels.csv"))
            if line.startswith(f"Doe_Patient1/{name},")
        )
        assert raw.json()["probabilities"]["Effusion"] == pytest.approx(
            dict(zip(by_uid[uid]["top_labels"], by_uid[uid]["top_probabilities"], strict=True))["Effusion"], abs=1e-4
        )
    finally:
        serve.delete("image")
    _assert_no_identifiers(medical["workspace"], output)


def _assert_no_identifiers(*roots: str) -> None:
    """Every text artefact and every string column the pipeline wrote, searched for identifiers."""
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".parquet"):
                    table = pq.read_table(path)
                    text = json.dumps(table.drop_columns([c for c in table.column_names if c == "image"]).to_pylist(), default=str)
                elif name.endswith((".json", ".yaml", ".yml", ".txt", ".csv", ".log")):
                    text = open(path, errors="replace").read()
                else:
                    continue
                for identifier in IDENTIFYING:
                    assert identifier not in text, f"{identifier!r} in {path}"
