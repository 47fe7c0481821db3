"""Does the click model recover a behavioural signal with a known true effect? (issue 18 item 3)

One synthetic Criteo-schema log with a behavioural term on the logit (``generate_criteo(...,
behaviour_effect=1.0)``: the user's smoothed click rate over their earlier events). The same
prepared data trains two models in one run:
- static: today's fields only (``CRITEO_OPTIONS``);
- behaviour: the same fields plus the behaviour features (``CRITEO_BEHAVIOUR_OPTIONS``).

Both are scored on the same time-split test window, next to two truths from the generator:
- the true model (``true_probability``: static terms and the behavioural term);
- the true model without the behavioural term (``true_static_probability``): the best any model
  that ignores history can rank.

The signal's share of AUC is true minus true-static; the model's is behaviour minus static. The
model recovers the signal when its share comes within 0.01 of the truth's. The whole-model gap
(true minus behaviour) is printed too: most of it is the static fields' long tail, which is there
with or without behaviour features.

Run: ``python benchmarks/ctr_behaviour_signal.py [--rows 300000] [--epochs 1]``
(``make bench-behaviour-signal`` runs 600k rows: ~15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
from sklearn.metrics import log_loss, roc_auc_score

from ray_app.demos.clicks import CRITEO_BEHAVIOUR_OPTIONS, CRITEO_OPTIONS, _chain, generate_criteo
from ray_app.prepared import load_manifest
from ray_app.runtime import connect

TARGET = 0.01


def truths_on_test_window(data: str, test_from: float) -> dict[str, dict[str, float]]:
    table = ds.dataset(data, format="parquet").to_table(
        columns=["click", "true_probability", "true_static_probability"], filter=pc.field("timestamp") >= test_from
    )
    labels = table["click"].to_numpy()
    out = {}
    for name in ("true_probability", "true_static_probability"):
        p = table[name].to_numpy()
        out[name] = {
            "auc": float(roc_auc_score(labels, p)),
            "log_loss": float(log_loss(labels, np.clip(p, 1e-7, 1 - 1e-7))),
            "rows": len(p),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=1, help="validation loss was lowest after 1 epoch at 600k rows")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="behaviour-signal-")
    connect()
    started = time.perf_counter()
    data = f"{workdir}/events"
    generate_criteo(data, args.rows, behaviour_effect=1.0)
    reports, seconds = {}, {}
    for name, options in (("static", CRITEO_OPTIONS), ("behaviour", CRITEO_BEHAVIOUR_OPTIONS)):
        t = time.perf_counter()
        config, reports[name] = _chain(f"{workdir}/ws-{name}", data, options, args.epochs)
        seconds[name] = round(time.perf_counter() - t, 1)
        test_from = load_manifest(config.train_data_uri())["time_cutoffs"][1]
    truth = truths_on_test_window(data, test_from)
    true_auc, true_static_auc = truth["true_probability"]["auc"], truth["true_static_probability"]["auc"]
    model, static = reports["behaviour"]["auc"], reports["static"]["auc"]
    signal_true, signal_model = true_auc - true_static_auc, model - static
    result = {
        "rows": args.rows,
        "epochs": args.epochs,
        "test_rows": truth["true_probability"]["rows"],
        "auc": {
            "true model": round(true_auc, 4),
            "true model without the behavioural term": round(true_static_auc, 4),
            "model with behaviour features": round(model, 4),
            "model on static fields only": round(static, 4),
            "per-item baseline": round(reports["behaviour"]["baseline"]["auc"], 4),
        },
        "log_loss": {
            "true model": round(truth["true_probability"]["log_loss"], 4),
            "model with behaviour features": round(reports["behaviour"]["log_loss"], 4),
            "model on static fields only": round(reports["static"]["log_loss"], 4),
        },
        "signal_auc_share": {
            "true": round(signal_true, 4),
            "model": round(signal_model, 4),
            "recovered": round(signal_model / signal_true, 3),
        },
        "signal_gap": round(signal_true - signal_model, 4),
        "signal_within_target": signal_true - signal_model <= TARGET,
        "whole_model_gap": round(true_auc - model, 4),
        "seconds": {"chains": seconds, "total": round(time.perf_counter() - started, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
