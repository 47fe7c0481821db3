"""Fast checks of the pieces: decoding, splits, config, CLI, npz input."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from ray_app.config import load_config
from ray_app.engine.train import cpus_per_worker
from ray_app.local_cluster import stop_local_cluster
from ray_app.runtime import forget_stale_cluster_address, unused_loopback_port
from ray_app.serving.app import ServeSettings
from ray_app.workloads import names
from ray_app.workloads.base import BadInput, assign_split
from ray_app.workloads.image import ImageOptions, ImageWorkload, decode_image


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_converts_channels_and_resizes():
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    gray = decode_image(_png(rgb), size=28, channels=1, max_bytes=10**6)
    assert gray.shape == (1, 28, 28) and gray.dtype == np.uint8
    color = decode_image(_png(rgb, "JPEG"), size=32, channels=3, max_bytes=10**6)
    assert color.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello", "not an image"),
        (_png(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8))[:400], "corrupt or truncated"),
        (b"x" * 2000, "too large"),
    ],
)
def test_decode_rejects_with_reason(data, reason):
    with pytest.raises(BadInput, match=reason):
        decode_image(data, size=28, channels=1, max_bytes=1000)


def test_split_assignment_is_stable_and_proportional():
    keys = [f"class/{i}.png" for i in range(5000)]
    splits = [assign_split(k, 0.1, 0.2) for k in keys]
    assert splits == [assign_split(k, 0.1, 0.2) for k in keys]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03
    assert abs(splits.count("val") / 5000 - 0.1) < 0.03


def test_config_layers_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.01\noptions:\n  image_size: 64\n")
    config = load_config("image", str(path), {"train.epochs": 2, "prepare.input": "/data"})
    assert (config.train.epochs, config.train.lr, config.options["image_size"]) == (2, 0.01, 64)
    with pytest.raises(ValueError):
        load_config("image", None, {"train.epochs": 0})
    with pytest.raises(ValueError):
        load_config("image", None, {"train.no_such_field": 1})


def test_workers_leave_a_cpu_for_data_on_small_machines():
    assert cpus_per_worker(None, 2, 2.0) == 0.5
    assert cpus_per_worker(None, 2, 16.0) == 1.0
    assert cpus_per_worker(None, 4, 0.0) == 1.0  # autoscaling cluster with an empty head: ask for whole CPUs
    assert cpus_per_worker(0.25, 2, 2.0) == 0.25


def test_npz_listing_reads_medmnist_layout(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 3, (10, 1)),
        test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        test_labels=np.array([[0], [1], [2], [2]]),
    )
    inputs = ImageWorkload().read_prepare_inputs(str(path), ImageOptions(class_names=["a", "b", "c"]), 0.1, 0.1, rows_per_block=4)
    assert inputs.rows_in == 14
    assert inputs.manifest["classes"] == ["a", "b", "c"]
    assert [row["split"] for row in inputs.dataset.take_all()] == ["train", "train", "train", "test"]


def test_cli_help_runs_without_ray():
    out = subprocess.run([sys.executable, "-m", "ray_app", "image", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--run-name" in out.stdout and "--num-workers" in out.stdout and "--image-size" in out.stdout


@pytest.mark.parametrize("name", ["image", "text", "ctr"])
def test_serve_configs_name_real_settings_and_workloads(name):
    path = os.path.join(os.path.dirname(__file__), "..", "cluster", "serve", f"{name}.yaml")
    config = yaml.safe_load(open(path))
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "ray_app.serving.app:build_app" and app["route_prefix"] == f"/{name}"
    settings = ServeSettings.model_validate(app["args"])  # unknown or mistyped keys fail here
    assert settings.workload == name and name in names()


def test_every_runnable_module_defines_everything_before_it_runs():
    """`python -m ray_app.x` runs the `__main__` block where it stands: anything defined below it
    does not exist yet (`make demo-ctr` once failed with a NameError this way)."""
    import ast
    from pathlib import Path

    import ray_app

    late = []
    for path in Path(ray_app.__file__).parent.rglob("*.py"):
        body = ast.parse(path.read_text()).body
        for index, node in enumerate(body):
            is_main = isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)
            if is_main and index != len(body) - 1:
                late.append(str(path.relative_to(Path(ray_app.__file__).parent)))
    assert not late, late


def test_calibration_error_weights_each_bucket_by_its_rows():
    from ray_app.workloads.ctr_metrics import calibration, calibration_error

    labels = np.array([0, 0, 0, 1] * 50 + [1] * 200)
    calibrated = np.array([0.25] * 200 + [1.0] * 200)
    assert calibration_error(calibration(labels, calibrated)) < 1e-12
    # Every prediction 0.1 off: the error is 0.1.
    shifted = np.array([0.35] * 200 + [0.9] * 200)
    assert abs(calibration_error(calibration(labels, shifted)) - 0.1) < 1e-12
    # One bad bucket of 40 rows among 400: it moves the error by its share, not by its whole gap.
    one_off = calibrated.copy()
    one_off[-40:] = 0.5
    buckets = calibration(labels, one_off)
    assert abs(calibration_error(buckets) - 40 * 0.5 / 400) < 1e-12 and max(abs(b["predicted"] - b["observed"]) for b in buckets) == 0.5


def test_stopping_a_cluster_forgets_its_address_as_ray_stop_does(tmp_path):
    """Ray writes the last started cluster's address to ``<temp dir>/ray_current_cluster``, and
    calls with no address read it, Ray Train's placement group cleaner among them. Left naming a
    stopped cluster, a later local session's cleaners waited on a dead GCS, never freed a Tune
    trial's CPUs, and the sweep hung. Another cluster's address is left alone."""
    address_file = tmp_path / "ray_current_cluster"
    address_file.write_text("192.0.2.2:6553")
    stop_local_cluster("192.0.2.2:6554", ray_temp_dir=str(tmp_path))  # nothing of it runs: no-op
    assert address_file.read_text() == "192.0.2.2:6553"
    stop_local_cluster("127.0.0.1:6553", ray_temp_dir=str(tmp_path))  # the same port on this machine
    assert not address_file.exists()


def test_a_local_start_forgets_an_address_file_naming_a_dead_local_cluster(tmp_path):
    """A cluster killed without ``ray stop`` leaves ``ray_current_cluster`` naming a dead GCS. A
    local instance's workers read it (Ray Train's placement group cleaner did, crashed, and a
    finished Tune trial kept its CPUs forever), so the local start removes it first. A live
    cluster's address, or another machine's, is left alone."""
    address_file = tmp_path / "ray_current_cluster"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address_file.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        forget_stale_cluster_address(str(tmp_path))
        assert address_file.exists()
    address_file.write_text("203.0.113.9:6379")  # TEST-NET-3: not this machine
    forget_stale_cluster_address(str(tmp_path))
    assert address_file.exists()
    address_file.write_text(f"127.0.0.1:{unused_loopback_port()}")
    forget_stale_cluster_address(str(tmp_path))
    assert not address_file.exists()
    forget_stale_cluster_address(str(tmp_path))  # no file: nothing to do


def test_reading_prepared_data_starts_no_actor_pool_for_parquet_footers(ray_session, tmp_path):
    """Ray 2.60 lists Parquet through a pool of 32 footer-reader actors per read by default: on a
    small machine each is a new Python process, and training re-reads its splits every epoch.
    Reading prepared data must use short tasks on the workers already running instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.util.state import list_actors

    from ray_app.prepared import read_split
    from ray_app.workloads.base import read_table

    folder = tmp_path / "prepared" / "status=ok"
    folder.mkdir(parents=True)
    for part in range(3):
        pq.write_table(
            pa.table({"x": [part * 10 + i for i in range(10)], "split": ["train"] * 6 + ["test"] * 4}), folder / f"{part}.parquet"
        )
    assert sorted(row["x"] for row in read_split(str(tmp_path / "prepared"), "test", ["x"]).take_all()) == [
        p * 10 + i for p in range(3) for i in range(6, 10)
    ]
    assert read_table(str(folder)).count() == 30
    footer_readers = list_actors(filters=[("class_name", "=", "FooterReader")], limit=1000, raise_on_missing_output=False)
    assert footer_readers == [], f"{len(footer_readers)} footer-reader actors for two small reads"


def test_ranks_take_equal_disjoint_shares_of_a_split_held_in_memory():
    """Every rank runs the same number of steps (DDP's collectives must line up): equal shares,
    disjoint, the remainder left out as Ray Data's equal split leaves it."""
    from ray_app.engine.train import rank_share

    columns = {"row": np.arange(11), "pixels": np.arange(22).reshape(11, 2)}
    shares = [rank_share(columns, rank, 3) for rank in range(3)]
    assert [len(s["row"]) for s in shares] == [3, 3, 3]
    assert sorted(np.concatenate([s["row"] for s in shares]).tolist()) == list(range(9))
    assert all((s["pixels"][:, 0] == 2 * s["row"]).all() for s in shares)  # columns stay row-aligned
    assert rank_share(columns, 0, 1)["row"].tolist() == list(range(11))  # one worker: the whole split
    assert rank_share({}, 1, 2) == {}


def test_a_shard_held_in_memory_is_fully_reshuffled_each_epoch_and_replayed_on_resume():
    """Small splits are taken from the object store by each training worker once and shuffled
    there per epoch (no Ray Data pass per epoch): every row once per epoch, a new order each epoch, the same order
    again for the same epoch (a resumed epoch skips exactly the batches it had trained)."""
    from ray_app.engine.train import in_memory_batches

    columns = {"label": np.arange(10) % 3, "row": np.arange(10)}

    def collate(batch):  # the workload's collate sees numpy columns, as from Ray Data
        return batch["row"].tolist(), batch["label"].tolist()

    def epoch_rows(epoch: int, training: bool = True, rank: int = 0) -> list[list[int]]:
        return [rows for rows, _ in in_memory_batches(columns, collate, 4, seed=7, epoch=epoch, training=training, rank=rank)]

    first, second = epoch_rows(1), epoch_rows(2)
    assert [len(b) for b in first] == [4, 4, 2]  # ceil(10 / 4) batches, as streaming gives
    assert sorted(sum(first, [])) == list(range(10)) == sorted(sum(second, []))
    assert first != second and first == epoch_rows(1)
    assert epoch_rows(1, rank=1) != first
    assert epoch_rows(1, training=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # validation in order


def test_a_port_for_a_later_listener_is_free_and_never_one_the_kernel_hands_out():
    """HAProxy's stats port, picked when the shared head started, was taken by the time Serve
    started HAProxy minutes later ("cannot bind socket (Address already in use)"): it came from
    the kernel's ephemeral range, which every outgoing connection draws from. Later listeners get
    ports between Ray's worker ports and that range."""
    import socket

    from ray_app.runtime import LATER_LISTENER_PORTS_FROM, ephemeral_port_range, unused_port_for_a_later_listener

    low, _ = ephemeral_port_range()
    ports = [unused_port_for_a_later_listener() for _ in range(20)]
    assert all(LATER_LISTENER_PORTS_FROM <= port < low for port in ports), ports
    assert len(set(ports)) > 1  # random, so two processes rarely pick the same one
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", ports[0]))  # free on every interface, as HAProxy binds it
