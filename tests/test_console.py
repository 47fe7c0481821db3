"""The model console's data, without Ray: a workload's registry record (version cards, alias
history) read from a real registry on disk, and DICOM previews from pydicom's own test files."""

from __future__ import annotations

import io
import json

import pydicom.data
import pytest
from PIL import Image

from ray_app.registry import ModelRegistry
from ray_app.serving.console import PREVIEW_SIZE, dicom_preview_png, registry_record


def _bundle(folder, marker: str) -> str:
    """A bundle folder as the registry sees it: weights bytes and a bundle.json naming their digest."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(marker.encode())
    (folder / "bundle.json").write_text(json.dumps({"weights_sha256": marker, "format_version": 1}))
    return str(folder)


def test_registry_record_has_each_versions_card_and_every_alias_move(tmp_path):
    registry = ModelRegistry(str(tmp_path / "models"))
    metadata = {
        "run_name": "r1",
        "data": "s3://bucket/ws/image/prepared",
        "data_fingerprint": "ab" * 32,
        "training_metrics": {"val_accuracy": 0.9},
        "evaluation": {"accuracy": 0.88},
        "config": {"train": {"lr": 0.001}},
    }
    first = registry.register("image", _bundle(tmp_path / "b1", "one"), metadata, alias="production", user="alice")
    second = registry.register("image", _bundle(tmp_path / "b2", "two"), {**metadata, "run_name": "r2"}, alias="production", user="bob")
    registry.rollback("image", "production", reason="v2 misbehaves", user="carol")

    record = registry_record(str(tmp_path / "models"), "image")

    assert record["aliases"] == {"production": first}
    assert [v["version"] for v in record["versions"]] == [first, second]
    card = record["versions"][1]
    assert card["run_name"] == "r2" and card["data"] == metadata["data"] and card["data_fingerprint"] == "ab" * 32
    assert card["evaluation"] == {"accuracy": 0.88} and card["training_metrics"] == {"val_accuracy": 0.9}
    assert card["registered_at"].startswith("20")
    assert "config" not in card
    moves = [(m["kind"], m["from"], m["to"], m["user"]) for m in record["history"]]
    assert moves == [("register", None, first, "alice"), ("register", first, second, "bob"), ("rollback", second, first, "carol")]
    assert record["history"][2]["reason"] == "v2 misbehaves"
    assert "aliases" not in record["history"][0]  # the move, not the whole alias map after it


def test_registry_record_of_an_empty_registry(tmp_path):
    assert registry_record(str(tmp_path / "nothing-here"), "ctr") == {"workload": "ctr", "aliases": {}, "versions": [], "history": []}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm"])
def test_dicom_preview_is_a_png_of_the_pixels_and_nothing_else(name):
    data = open(pydicom.data.get_testdata_file(name), "rb").read()
    patient_name = str(pydicom.dcmread(io.BytesIO(data)).PatientName).encode()
    png = dicom_preview_png(data)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (PREVIEW_SIZE, PREVIEW_SIZE)
    low, high = image.convert("L").getextrema()
    assert high - low > 50  # windowed to a visible range, not a flat grey
    assert not patient_name or patient_name not in png


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x89PNG\r\n\x1a\n" + b"0" * 64, "not a DICOM file"),
        (open(pydicom.data.get_testdata_file("rtplan.dcm"), "rb").read(), "RT Plan"),
    ],
)
def test_what_cannot_be_previewed_says_why(data, reason):
    with pytest.raises(ValueError, match=reason):
        dicom_preview_png(data)
