"""The full image chain through the CLI on real digits: prepare -> train -> evaluate -> register -> predict."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.registry import ModelRegistry

BROKEN_FILES = 5  # written by demo_data.write_broken_files


def test_prepare_counts_add_up_and_rejects_keep_reasons(trained_workspace, demo_images):
    prepared = trained_workspace["prepared"]
    files_on_disk = sum(len(files) for _, _, files in os.walk(demo_images))
    assert prepared["rows_in"] == files_on_disk
    assert prepared["rows_in"] == prepared["rows_ok"] + prepared["rows_rejected"]
    assert prepared["rows_rejected"] == BROKEN_FILES
    rejects = pq.read_table(prepared["rejects"]).to_pylist()
    by_name = {os.path.basename(r["path"]): r["reject_reason"] for r in rejects}
    assert by_name["empty.png"] == "empty file"
    assert "not inside a class folder" in by_name["stray.png"]
    assert "not an image" in by_name["notes.txt"]
    assert set(by_name) == {"empty.png", "stray.png", "notes.txt", "corrupt.png", "truncated.png"}
    assert sum(prepared["splits"].values()) == prepared["rows_ok"]
    assert all(prepared["splits"][split] > 0 for split in ("train", "val", "test"))


def test_training_learns_well_above_chance(trained_workspace):
    trained, evaluated = trained_workspace["trained"], trained_workspace["evaluated"]
    assert trained["epochs_completed"] == 5
    assert trained["resumed_at"] == []
    assert evaluated["accuracy"] > 0.5, evaluated  # 10 classes: chance is 0.1
    assert evaluated["accuracy"] > 2 * evaluated["majority_class_accuracy"]
    run = os.path.dirname(evaluated["output"])
    for artefact in ("history.json", "curves.png", "config.train.yaml", "evaluation/report.json", "evaluation/confusion_matrix.png"):
        assert os.path.getsize(os.path.join(run, artefact)) > 0, artefact
    history = storage.read_json(os.path.join(run, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_registry_records_version_alias_and_metadata(trained_workspace):
    registry = ModelRegistry(os.path.join(trained_workspace["workspace"], "models"))
    version = trained_workspace["registered"]["version"]
    assert registry.resolve_version("image", "production") == version
    metadata = registry.metadata("image", version)
    assert metadata["evaluation"]["accuracy"] == trained_workspace["evaluated"]["accuracy"]
    assert len(metadata["data_fingerprint"]) == 64
    assert metadata["run_name"] == "chain"


def test_batch_predict_covers_every_input_file(trained_workspace, demo_images, tmp_path):
    output = str(tmp_path / "predictions")
    summary = run_cli(
        [
            "image",
            "predict",
            "--workspace",
            trained_workspace["workspace"],
            "--input",
            demo_images,
            "--output",
            output,
            "--model",
            "production",
            "--batch-size",
            "64",
        ]
    )
    files_on_disk = sum(len(files) for _, _, files in os.walk(demo_images))
    assert summary["rows_in"] == files_on_disk
    # stray.png is a valid image: at predict time folders carry no meaning, so only 4 are rejects.
    assert summary["rows_rejected"] == BROKEN_FILES - 1
    assert summary["rows_ok"] + summary["rows_rejected"] == files_on_disk
    ok = pq.read_table(os.path.join(output, "status=ok")).to_pylist()
    assert len(ok) == summary["rows_ok"]
    assert all(0 < row["probability"] <= 1 and row["label"] == row["top_labels"][0] for row in ok)
    # Folder names are the truth: most predictions must match them.
    labelled = [r for r in ok if os.path.basename(os.path.dirname(r["path"])).isdigit()]
    correct = sum(os.path.basename(os.path.dirname(r["path"])) == r["label"] for r in labelled)
    assert correct / len(labelled) > 0.6
