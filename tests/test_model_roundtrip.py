"""Checkpoint -> registry -> load reproduces predictions exactly; tampered weights are refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from ray_app import storage
from ray_app.bundle import WEIGHTS_FILE, load_bundle
from ray_app.engine.train import SUMMARY_FILE
from ray_app.registry import ModelRegistry, resolve_model_uri


def _sample_images(demo_images: str, n: int = 16) -> list[bytes]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(demo_images) for f in files if f[0].isdigit())[:n]
    return [open(p, "rb").read() for p in paths]


def test_registered_version_predicts_exactly_like_the_checkpoint(trained_workspace, demo_images):
    workspace = trained_workspace["workspace"]
    checkpoint = storage.read_json(os.path.join(workspace, "image", "runs", "chain", SUMMARY_FILE))["checkpoint"]
    registered = resolve_model_uri(os.path.join(workspace, "models"), "image", "production")
    from_checkpoint, from_registry = load_bundle(checkpoint), load_bundle(registered)
    images = [
        from_checkpoint.workload.decode_item(b, from_checkpoint.options, from_checkpoint.manifest) for b in _sample_images(demo_images)
    ]
    inputs = from_checkpoint.workload.stack_items(images, from_checkpoint.options, from_checkpoint.manifest)
    np.testing.assert_array_equal(from_checkpoint.predict_proba(inputs), from_registry.predict_proba(inputs))
    assert from_registry.info["version"] == trained_workspace["registered"]["version"]


def test_weights_that_do_not_match_their_hash_are_refused(trained_workspace, tmp_path):
    source = resolve_model_uri(os.path.join(trained_workspace["workspace"], "models"), "image", "production")
    tampered = tmp_path / "tampered"
    shutil.copytree(source, tampered)
    with open(tampered / WEIGHTS_FILE, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="SHA-256"):
        load_bundle(str(tampered))


def test_alias_moves_between_versions(trained_workspace, tmp_path):
    registry = ModelRegistry(str(tmp_path / "models"))
    source = resolve_model_uri(os.path.join(trained_workspace["workspace"], "models"), "image", "production")
    first = registry.register("image", source, {"note": "first"}, alias="production")
    second = registry.register("image", source, {"note": "second"}, alias="staging")
    assert (first, second) == (1, 2)
    assert registry.resolve_version("image", "production") == 1
    registry.set_alias("image", "production", 2)
    assert registry.resolve_version("image", "production") == 2
    assert registry.resolve_version("image", "v1") == 1 and registry.resolve_version("image", "latest") == 2
    with pytest.raises(LookupError):
        registry.resolve_version("image", "canary")
    with pytest.raises(ValueError):
        registry.set_alias("image", "production", 7)
