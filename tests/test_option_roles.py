"""One source for options (no Ray): which stage decides each option, and a flag that contradicts a
recorded value is refused with both values. Plus the pieces of resume that need no workers:
class-mixed row order and the generator states a checkpoint carries."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ray_app.engine.train import restore_rng_state, rng_state
from ray_app.workloads import get_workload, names
from ray_app.workloads.base import DATA, MODEL, STAGES, OptionConflict, stable_order


@pytest.mark.parametrize("workload_name", names())
def test_every_option_has_a_deciding_stage(workload_name):
    workload = get_workload(workload_name)
    assert set(workload.option_stages) == set(workload.Options.model_fields)
    assert all(stages and stages <= set(STAGES) for stages in workload.option_stages.values())
    # Model options are never data options, and the data options are named in one place.
    assert not set(workload.data_options()) & {n for n, s in workload.option_stages.items() if s == MODEL}


def test_train_takes_image_shape_from_prepare_and_refuses_a_contradicting_flag():
    image = get_workload("image")
    recorded = image.resolve_options("prepare", {"image_size": 64, "channels": 3}, None).model_dump()
    plain = image.resolve_options("train", {"width": 4}, recorded)
    assert (plain.image_size, plain.channels, plain.width) == (64, 3, 4)
    with pytest.raises(OptionConflict) as refused:
        image.resolve_options("train", {"image_size": 28}, recorded)
    assert "--image-size 28 contradicts 64" in str(refused.value)
    # Repeating the recorded value is fine: one YAML config can serve every stage.
    assert image.resolve_options("train", {"image_size": 64}, recorded).image_size == 64


def test_model_options_belong_to_train():
    image = get_workload("image")
    with pytest.raises(OptionConflict, match="--width 8 has no effect at prepare"):
        image.resolve_options("prepare", {"width": 8}, None)
    bundle = image.resolve_options("train", {"width": 4}, image.resolve_options("prepare", {}, None).model_dump()).model_dump()
    with pytest.raises(OptionConflict, match="--width 8 contradicts 4 recorded with the model"):
        image.resolve_options("predict", {"width": 8}, bundle)
    # Serve decodes with the model's recorded limit: a different one would be ignored, so refused.
    with pytest.raises(OptionConflict, match="--max-file-bytes 10 has no effect at serve"):
        image.resolve_options("serve", {"max_file_bytes": 10}, bundle)
    assert image.resolve_options("predict", {"max_file_bytes": 10}, bundle).max_file_bytes == 10


def test_text_predict_honours_id_column_and_refuses_max_length():
    text = get_workload("text")
    bundle = text.resolve_options("prepare", {"max_length": 64, "id_column": "review_id"}, None).model_dump()
    assert text.resolve_options("predict", {}, bundle).id_column == "review_id"  # prepare's, by default
    assert text.resolve_options("predict", {"id_column": "doc_id"}, bundle).id_column == "doc_id"
    assert text.resolve_options("train", {}, bundle).max_length == 64
    with pytest.raises(OptionConflict) as refused:
        text.resolve_options("predict", {"max_length": 128, "baseline_train_rows": 5}, bundle)
    message = str(refused.value)
    assert "--max-length 128 contradicts 64 recorded at prepare" in message
    assert "--baseline-train-rows 5 has no effect at predict (it applies at evaluate" in message


def test_ctr_feature_columns_come_from_prepare():
    ctr = get_workload("ctr")
    recorded = ctr.resolve_options("prepare", {"numeric_columns": ["age"], "categorical_columns": ["genre"]}, None).model_dump()
    assert ctr.resolve_options("serve", {}, recorded).numeric_columns == ["age"]
    with pytest.raises(OptionConflict, match=r"--numeric-columns \['age', 'year'\] contradicts \['age'\]"):
        ctr.resolve_options("train", {"numeric_columns": ["age", "year"]}, recorded)
    assert get_workload("ctr").deciding_stages("embedding_dim") == MODEL
    assert get_workload("ctr").deciding_stages("buckets") == DATA


def test_stable_order_mixes_a_class_sorted_listing():
    keys = [f"{digit}/{n}.png" for digit in range(10) for n in range(100)]  # class-folder order
    ordered = [keys[i] for i in stable_order(keys)]
    assert sorted(ordered) == sorted(keys) and ordered == [keys[i] for i in stable_order(keys)]  # a permutation, stable
    for start in range(0, 1000, 64):
        assert len({k.split("/")[0] for k in ordered[start : start + 64]}) >= 8


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    # weights_only: the loader a checkpoint is read with must accept every saved state.
    restore_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
