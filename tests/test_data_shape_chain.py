"""Class-mixed training batches, on real digits (scikit-learn's 1,797 8×8 images) written class
folder by class folder: the training stream, read exactly as train reads it, mixes classes from the
first batch. Also: row ids for table inputs, and the text chain's prepared max length. (Prepare
options carried through train, predict and serve: test_image_chain, on the main image chain.)
"""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_app import storage
from ray_app.cli import run_cli
from ray_app.engine.train import WorkloadCollate, training_batches, training_dataset
from ray_app.prepared import load_manifest, read_split, split_columns
from ray_app.workloads import get_workload

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


def test_a_split_read_into_memory_matches_what_ray_data_reads(shaped):
    """Training holds small splits in memory, read without a Ray Data pipeline (split_columns):
    every column, tensors included, must arrive as Ray Data's numpy batches give it."""
    workload = get_workload("image")
    data = shaped["prepared"]["output"]
    for split in ("train", "val"):
        direct = split_columns(data, split, workload.training_columns)
        streamed = read_split(data, split, workload.training_columns).take_batch(batch_size=1_000_000, batch_format="numpy")
        assert set(direct) == set(streamed) == set(workload.training_columns)
        for column in direct:
            assert direct[column].dtype == streamed[column].dtype and direct[column].shape == streamed[column].shape, column
        key = lambda columns, i: (int(columns["label"][i]), np.asarray(columns["image"][i]).tobytes())  # noqa: E731
        rows = len(direct["label"])  # the same rows; their order is the files' (either is shuffled per epoch)
        assert sorted(key(direct, i) for i in range(rows)) == sorted(key(streamed, i) for i in range(rows))


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
    """The fixtures prepare text at --max-length 32 and never repeat it: train used 32, not 128."""
    bundle = storage.read_json(os.path.join(text_run["trained"]["checkpoint"], "bundle.json"))
    assert bundle["options"]["max_length"] == 32
