"""The full image chain through the CLI on real digits: prepare -> train -> evaluate -> register ->
predict -> serve. Prepared at 32×32 RGB (conftest): the later stages take that shape from prepare
without the flags being repeated, and refuse flags that contradict it."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import requests
from ray import serve

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.demos.data import first_digit_file
from ray_app.registry import ModelRegistry
from ray_app.workloads.base import OptionConflict

BROKEN_FILES = 5  # written by demos.data.write_broken_files


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
    assert trained["epochs_completed"] == 3
    assert trained["resumed_at"] == []
    assert evaluated["accuracy"] > 0.5, evaluated  # 10 classes: chance is 0.1
    assert evaluated["accuracy"] > 2 * evaluated["majority_class_accuracy"]
    run = os.path.dirname(evaluated["output"])
    for artefact in ("history.json", "curves.png", "config.train.yaml", "evaluation/report.json", "evaluation/confusion_matrix.png"):
        assert os.path.getsize(os.path.join(run, artefact)) > 0, artefact
    history = storage.read_json(os.path.join(run, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_small_splits_train_from_memory_without_split_coordinators(trained_workspace):
    """The chain's splits (a few hundred images) are read once into the object store and each rank
    takes its share there: the 2-worker run starts no split coordinator (an actor process per
    split, started before the first step; two before this change). test_training_recovery streams
    them instead."""
    assert trained_workspace["training_data_actors"] == set()


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
    assert len(ok) == summary["rows_ok"] and len({row["path"] for row in ok}) == len(ok)
    assert all(0 < row["probability"] <= 1 and row["label"] == row["top_labels"][0] for row in ok)
    # Folder names are the truth: most predictions must match them.
    labelled = [r for r in ok if os.path.basename(os.path.dirname(r["path"])).isdigit()]
    correct = sum(os.path.basename(os.path.dirname(r["path"])) == r["label"] for r in labelled)
    assert correct / len(labelled) > 0.6


def test_prepare_options_carry_through_train_predict_and_serve(trained_workspace, demo_images, start_endpoint, tmp_path):
    """prepare --image-size 32 --channels 3 once: train used them (the bundle records them), a
    contradicting flag at train or predict is refused before any work, and the endpoint decodes
    a grey 28×28 upload to the bundle's 32×32 RGB: an answer, not a shape error."""
    workspace = trained_workspace["workspace"]
    bundle = storage.read_json(os.path.join(trained_workspace["trained"]["checkpoint"], "bundle.json"))
    assert (bundle["options"]["image_size"], bundle["options"]["channels"]) == (32, 3)
    with pytest.raises(OptionConflict, match="--image-size 28 contradicts 32 recorded at prepare"):
        run_cli(["image", "train", "--workspace", workspace, "--run-name", "shaped", "--image-size", "28"])
    with pytest.raises(OptionConflict, match="--channels 1 contradicts 3"):
        run_cli(["image", "predict", "--workspace", workspace, "--input", demo_images, "--output", str(tmp_path / "p"), "--channels", "1"])

    endpoint = start_endpoint("image", workspace, min_replicas=1, max_replicas=1)
    try:
        with open(first_digit_file(demo_images, "7"), "rb") as f:
            answer = requests.post(endpoint, data=f.read(), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] in [str(d) for d in range(10)]
    finally:
        serve.delete("image")


def _worse_run(workspace: str, run_name: str) -> str:
    """A run whose checkpoint is the chain's model with its output classes rotated by one: a real,
    loadable model that is clearly worse on the same test split."""
    import torch

    from ray_app.bundle import load_bundle, save_bundle
    from ray_app.engine.train import SUMMARY_FILE

    good = load_bundle(storage.read_json(os.path.join(workspace, "image", "runs", "chain", SUMMARY_FILE))["checkpoint"])
    last = [m for m in good.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.copy_(last.weight.roll(1, dims=0))
        last.bias.copy_(last.bias.roll(1, dims=0))
    run = os.path.join(workspace, "image", "runs", run_name)
    save_bundle(good.model, os.path.join(run, "checkpoint"), {k: v for k, v in good.info.items() if k != "weights_sha256"})
    storage.write_json(os.path.join(run, SUMMARY_FILE), {"checkpoint": os.path.join(run, "checkpoint")})
    return run


def test_promotion_gate_refuses_a_worse_model_force_moves_it_rollback_restores(trained_workspace):
    workspace = trained_workspace["workspace"]
    registry = ModelRegistry(os.path.join(workspace, "models"))
    good = registry.resolve_version("image", "production")
    versions_before = registry.versions("image")
    run = _worse_run(workspace, "worse")
    common = ["image", "register", "--workspace", workspace, "--run-name", "worse", "--alias", "production"]

    # The chain's evaluation report belongs to other weights: refused before anything is scored.
    chain_report = os.path.join(workspace, "image", "runs", "chain", "evaluation", "report.json")
    storage.write_json(os.path.join(run, "evaluation", "report.json"), storage.read_json(chain_report))
    with pytest.raises(SystemExit, match=r"evaluation report .* is for weights .* not for the checkpoint being registered"):
        run_cli(common)
    os.remove(os.path.join(run, "evaluation", "report.json"))

    # Both models re-scored on the same test rows: the worse one may not take the alias...
    with pytest.raises(SystemExit, match=r"refusing to move 'production'.*accuracy 0\.\d+ against 0\.\d+ for version") as refused:
        run_cli(common)
    assert "--force" in str(refused.value)
    assert registry.versions("image") == versions_before and registry.resolve_version("image", "production") == good

    # ...unless forced; the decision and both scores go into the summary and the alias history.
    forced = run_cli([*common, "--force", "--reason", "test: forced"])
    gate = forced["promotion"]
    assert gate["forced"] and not gate["passed"] and gate["metric"] == "accuracy" and gate["rows"] > 0
    assert gate["candidate"]["score"] < gate["current"]["score"] - gate["tolerance"] and gate["current"]["version"] == good
    assert registry.resolve_version("image", "production") == forced["version"]
    moved = registry.alias_history("image", "production")[-1]
    assert (moved["from"], moved["to"], moved["reason"], moved["metrics"]) == (good, forced["version"], "test: forced", gate)

    # One command takes production back.
    rolled = run_cli(["image", "rollback", "--workspace", workspace, "--alias", "production"])
    assert (rolled["from"], rolled["to"]) == (forced["version"], good)
    assert registry.resolve_version("image", "production") == good
    assert registry.alias_history("image", "production")[-1]["kind"] == "rollback"
