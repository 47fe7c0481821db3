"""Data-shaping options end to end and class-mixed training batches, on real digits (scikit-learn's
1,797 8×8 images) written class folder by class folder.

prepare --image-size 32 --channels 3 once; then train, predict and serve never repeat the flags,
and the training stream read exactly as train reads it mixes classes from the first batch.
"""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image
from ray import serve

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.engine.train import WorkloadCollate, training_batches, training_dataset
from ray_app.prepared import load_manifest
from ray_app.workloads import get_workload
from ray_app.workloads.base import OptionConflict

# Neither is the default (28, 1); 32×32 RGB rows (3 KB) also make the prepared split span several
# Ray Data blocks (~1 MiB each), as real data does, so a class-sorted block would show in batches.
SIZE, CHANNELS = 32, 3


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sorted_digits(tmp_path_factory) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("sorted") / "digits"
    for index in np.argsort(digits.target, kind="stable"):  # written (and listed) class by class
        label = int(digits.target[index])
        os.makedirs(folder / str(label), exist_ok=True)
        (folder / str(label) / f"{index:04d}.png").write_bytes(_png((digits.images[index] * 15.9).astype(np.uint8)))
    return str(folder)


@pytest.fixture(scope="module")
def shaped(ray_session, sorted_digits, tmp_path_factory) -> dict:
    workspace = str(tmp_path_factory.mktemp("shaped"))
    common = ["--workspace", workspace]
    prepared = run_cli(["image", "prepare", *common, "--input", sorted_digits, "--image-size", str(SIZE), "--channels", str(CHANNELS)])
    return {"workspace": workspace, "common": common, "prepared": prepared}


def test_training_batches_mix_classes_from_the_first_step(shaped):
    """10 balanced classes, batches of 64: each of the first 20 batches holds at least 8 classes,
    on the prepared split read by the same functions the training loop uses."""
    workload = get_workload("image")
    data = shaped["prepared"]["output"]
    manifest = load_manifest(data)
    assert shaped["prepared"]["splits"]["train"] >= 20 * 64
    collate = WorkloadCollate(workload, workload.parse_options(manifest["options"]), manifest)
    batches = training_batches(training_dataset(data, "train", workload, seed=0), collate, 64, seed=0, epoch=1, training=True)
    classes_per_batch = [len(set(targets.tolist())) for _, targets in itertools.islice(batches, 20)]
    assert len(classes_per_batch) == 20 and min(classes_per_batch) >= 8, classes_per_batch


def test_prepare_options_carry_through_train_predict_and_serve(shaped, sorted_digits, start_endpoint, tmp_path):
    common = shaped["common"]
    with pytest.raises(OptionConflict, match="--image-size 28 contradicts 32 recorded at prepare"):
        run_cli(["image", "train", *common, "--run-name", "shaped", "--image-size", "28"])
    trained = run_cli(["image", "train", *common, "--run-name", "shaped", "--epochs", "1", "--width", "4", "--num-workers", "1"])
    bundle = storage.read_json(os.path.join(trained["checkpoint"], "bundle.json"))
    assert (bundle["options"]["image_size"], bundle["options"]["channels"], bundle["options"]["width"]) == (SIZE, CHANNELS, 4)
    run_cli(["image", "register", *common, "--run-name", "shaped", "--alias", "production"])

    some_digits = tmp_path / "some"
    for digit in ("0", "7"):
        os.makedirs(some_digits / digit)
        for name in sorted(os.listdir(os.path.join(sorted_digits, digit)))[:10]:
            (some_digits / digit / name).write_bytes(open(os.path.join(sorted_digits, digit, name), "rb").read())
    output = str(tmp_path / "predictions")
    with pytest.raises(OptionConflict, match="--channels 1 contradicts 3"):
        run_cli(["image", "predict", *common, "--input", str(some_digits), "--output", output, "--channels", "1"])
    predicted = run_cli(["image", "predict", *common, "--input", str(some_digits), "--output", output])
    assert predicted["rows_ok"] == 20 and predicted["rows_rejected"] == 0
    ids = pq.read_table(os.path.join(output, "status=ok"), columns=["path"])["path"].to_pylist()
    assert len(set(ids)) == 20

    # Serve decodes with the bundle's 32×32 RGB: a grey 8×8 upload gets an answer, not a shape error.
    endpoint = start_endpoint("image", shaped["workspace"], min_replicas=1, max_replicas=1)
    try:
        with open(os.path.join(some_digits, "7", sorted(os.listdir(some_digits / "7"))[0]), "rb") as f:
            answer = requests.post(endpoint, data=f.read(), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] in [str(d) for d in range(10)]
    finally:
        serve.shutdown()


def test_table_rows_for_prediction_get_unique_file_and_row_ids(ray_session, tmp_path):
    """Tables to predict: every row carries '<file>#<row in file>' (Parquet row groups and CSV
    files alike), so outputs without an id column still name each input row once."""
    import pyarrow as pa

    from ray_app.workloads.base import ROW_ID_COLUMN, read_table_rows

    folder = tmp_path / "events"
    folder.mkdir()
    pq.write_table(pa.table({"x": list(range(10))}), folder / "a.parquet", row_group_size=4)  # 3 row groups
    pq.write_table(pa.table({"x": list(range(10, 15))}), folder / "b.parquet")
    rows = read_table_rows(str(folder)).take_all()
    ids = {row["x"]: row[ROW_ID_COLUMN] for row in rows}
    assert len(rows) == 15 and len(set(ids.values())) == 15
    assert ids[5] == f"{folder / 'a.parquet'}#5" and ids[10] == f"{folder / 'b.parquet'}#0"
    csv = tmp_path / "clicks.csv"
    csv.write_text("age,click\n1,0\n2,1\n3,0\n")
    assert sorted(r[ROW_ID_COLUMN] for r in read_table_rows(str(csv)).take_all()) == [f"{csv}#{i}" for i in range(3)]


def test_text_chain_trains_and_serves_at_the_prepared_max_length(text_run):
    """The fixtures prepare text at --max-length 64 and never repeat it: train used 64, not 128."""
    bundle = storage.read_json(os.path.join(text_run["trained"]["checkpoint"], "bundle.json"))
    assert bundle["options"]["max_length"] == 64
