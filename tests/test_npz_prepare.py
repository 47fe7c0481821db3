"""MedMNIST-style .npz input through the real prepare stage."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from ray_app.cli import run_cli


def test_npz_prepare_keeps_splits_and_counts(ray_session, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "pathmnist_tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (30, 28, 28, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 4, (30, 1)),
        val_images=rng.integers(0, 255, (6, 28, 28, 3), dtype=np.uint8),
        val_labels=rng.integers(0, 4, (6, 1)),
        test_images=rng.integers(0, 255, (8, 28, 28, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 4, (8, 1)),
    )
    summary = run_cli(
        [
            "image",
            "prepare",
            "--workspace",
            str(tmp_path / "ws"),
            "--input",
            str(path),
            "--channels",
            "3",
            "--image-size",
            "32",
            "--rows-per-block",
            "16",
        ]
    )
    assert (summary["rows_in"], summary["rows_ok"], summary["rows_rejected"]) == (44, 44, 0)
    assert summary["splits"] == {"train": 30, "val": 6, "test": 8}
    table = pq.read_table(summary["output"] + "/status=ok")
    assert {len(b) for b in table.column("image").to_pylist()} == {3 * 32 * 32}
