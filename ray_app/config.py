"""Typed configuration: defaults < YAML file < CLI overrides. The resolved config is saved with
every stage's outputs so a run can be reproduced from what it wrote.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_app import storage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareConfig(_Section):
    input: str | None = Field(None, description="raw data URI (folder of class folders, .npz, table)")
    output: str | None = Field(None, description="prepared Parquet URI (default: <workspace>/<workload>/prepared)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows for validation")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows held out for evaluate")
    # Measured: 1024 rows per call ran 1.5x faster in steady state than 256 (224×224 PNG, 2 cores).
    rows_per_block: int = Field(1024, gt=0, description="rows decoded per preparer call (one Ray Data batch)")
    concurrency: int = Field(2, gt=0, description="parallel prepare actors")


class TrainConfig(_Section):
    data: str | None = Field(None, description="prepared data URI (default: prepare's output)")
    run_name: str = Field("default", description="re-running the same name resumes from its last checkpoint")
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0, description="per-worker batch size")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps with linear LR warm-up")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, CUDA + mixed precision")
    # Ray Train reserves a whole TPU slice; torch's TPU backend comes with the TPU image, not with
    # this project (cluster/Dockerfile). Not run here: no TPU.
    use_tpu: bool = Field(False, description="train on a TPU slice, one chip per worker (Ray Train use_tpu; needs the -tpu image)")
    tpu_topology: str | None = Field(None, description="TPU slice topology, e.g. 2x2x1 (with --use-tpu)")
    tpu_accelerator_type: str | None = Field(None, description="TPU generation, e.g. TPU-V4 (with --use-tpu)")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker; default 1, or less on a machine so small that nothing would be left to feed data"
    )
    max_failures: int = Field(2, ge=-1, description="worker failures survived by restarting from checkpoint")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also checkpoint every N training steps (0: only at epoch ends); a preempted worker then loses minutes"
    )
    fresh: bool = Field(False, description="start this run name from scratch; the old run is kept until the new one completes")
    stream_splits: bool = Field(
        False, description="stream the splits from Parquet every epoch, even when they are small enough to be held in memory once"
    )
    seed: int = 0


class EvaluateConfig(_Section):
    model: str | None = Field(None, description="registry ref (e.g. production, 3) or checkpoint URI; default: run's latest checkpoint")
    output: str | None = Field(None, description="report folder (default: the run's evaluation/)")
    batch_size: int = 256


class RegisterConfig(_Section):
    alias: str | None = Field("production", description="alias moved to the new version")
    reason: str | None = Field(None, description="why the alias moves (kept in the alias history)")
    force: bool = Field(False, description="move the alias even if the new model scores worse than the alias's current model")
    gate_metric: str | None = Field(None, description="metric both models are re-scored on (default: auc for ctr, accuracy otherwise)")
    gate_tolerance: float = Field(0.005, ge=0, description="how much worse than the current model the new one may score")
    onnx: bool = Field(True, description="export the model to ONNX (dynamic batch) for torch-free CPU serving and predict")
    onnx_tolerance: float = Field(1e-4, ge=0, description="largest probability difference ONNX Runtime may show vs torch (held-out rows)")
    onnx_parity_rows: int = Field(256, gt=0, description="held-out (test split) rows the ONNX export is checked on")
    onnx_int8: bool | None = Field(None, description="also make an int8 (dynamic quantization) copy (default: text only)")
    int8_tolerance: float = Field(0.01, ge=0, description="accuracy the int8 copy may lose on the test split and still be used")
    int8_eval_rows: int = Field(2000, gt=0, description="test rows the int8 copy's accuracy change is measured on (at most)")


class RollbackConfig(_Section):
    alias: str = Field("production", description="alias moved back to the version it had before its last move")
    reason: str | None = Field(None, description="why (kept in the alias history)")


class PredictConfig(_Section):
    input: str | None = Field(None, description="URI of the items to score")
    output: str | None = Field(None, description="predictions Parquet URI")
    model: str = Field("production", description="registry alias or version, or a checkpoint URI")
    batch_size: int = Field(256, gt=0)
    concurrency: int = Field(2, gt=0, description="model actors (each loads the model once)")
    input_list: str | None = Field(
        None, description="URI of a text file naming the inputs, one URI per line (instead of --input; the upload watcher's grouped jobs)"
    )
    use_gpu: bool = False
    runtime: str = Field("torch", pattern="^(auto|torch|onnx)$", description="CPU actors: onnx runs the version's ONNX export")
    onnx_precision: str = Field("auto", pattern="^(auto|fp32|int8)$", description="auto: the int8 text export where register accepted it")


class DeploymentScaling(_Section):
    """How a Serve deployment scales and admits requests; the gateway and every model deployment
    share it (each with its own defaults), and ``deployment_options`` is its one translation into
    ``Deployment.options``."""

    min_replicas: int = Field(1, ge=0, description="0 = scale to zero when idle")
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(4, gt=0)
    max_ongoing_requests: int = Field(64, gt=0)
    # Fast reaction by default: on a request to a scaled-to-zero deployment, every second counts.
    upscale_delay_s: float = Field(0.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0, description="idle time before replicas (down to min_replicas) are removed")
    look_back_period_s: float = Field(2.0, gt=0)
    metrics_interval_s: float = Field(0.5, gt=0)
    max_queued_requests: int = Field(256, description="requests waiting for a replica beyond which new ones get 503 (-1: no limit)")
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    # Ray's default is 2 s, and a stopping replica sleeps one loop before its first check: every
    # scale-down, redeploy, rollout and `serve delete` waited at least 2 s per replica, idle or not.
    graceful_shutdown_wait_loop_s: float = Field(
        0.5, gt=0, description="how often a stopping replica checks that its in-flight requests are done"
    )
    # Serve sees a crashed replica (OOM kill, segfault) only on its next health check: at Ray's 10 s
    # the deployment ran a replica short for up to 10 s before a replacement started.
    health_check_period_s: float = Field(2.0, gt=0, description="how often the Serve controller checks each replica is alive")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
                "metrics_interval_s": self.metrics_interval_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


class ReleaseConfig(_Section):
    """A candidate version served next to the stable one (``ray_app.serving.release``): canary
    traffic with automatic rollback and promotion, or shadow traffic whose answers are compared."""

    candidate: str = Field(description="registry version or alias of the candidate (the stable model is ``serve.model``)")
    mode: Literal["canary", "shadow"] = Field("canary", description="canary: a share of requests is answered by the candidate; "
                                              "shadow: a share is mirrored to it, its answers discarded and compared")  # fmt: skip
    traffic_percent: float = Field(10.0, ge=0, le=100, description="share of requests sent (canary) or mirrored (shadow) to the candidate")
    header: str = Field("x-ray-app-cohort", description="a request with this header set to 'canary' or 'stable' picks its version")
    cohort_header: str | None = Field(
        None, description="e.g. x-user-id: its value is hashed to a stable bucket, so one user always gets the same version"
    )
    window_s: float = Field(60.0, gt=0, description="the judging window: the candidate is promoted after one full healthy window")
    min_requests: int = Field(20, gt=0, description="requests per version in the window before it is judged")
    max_error_rate_margin: float = Field(0.01, ge=0, description="rolled back when its error rate exceeds stable's by more than this")
    max_p99_margin_ratio: float = Field(0.5, ge=0, description="rolled back when its p99 exceeds stable's p99 x (1 + ratio) + ms")
    max_p99_margin_ms: float = Field(50.0, ge=0)
    promote: bool = Field(True, description="canary: move the stable alias to the candidate after a healthy window (shadow never does)")
    candidate_timeout_s: float = Field(10.0, gt=0, description="a canary request the candidate has not answered by then goes to stable")
    max_shadow_in_flight: int = Field(32, gt=0, description="mirrored calls beyond this many in flight are skipped, not queued")
    report_interval_s: float = Field(0.5, gt=0, description="how often each gateway replica sends its counts to the release judge")


class ServeConfig(DeploymentScaling):
    model: str = Field("production", description="registry alias or version, or a bundle URI")
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = 8000
    route_prefix: str | None = None
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_items_per_request: int = Field(64, gt=0, description="items (e.g. texts, events) allowed in one request")
    top_k: int = Field(3, gt=0)
    max_batch_size: int = Field(32, gt=0, description="@serve.batch size; 1 disables batching")
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered in time gets 503 instead of hanging")
    alias_poll_s: float = Field(10.0, ge=0, description="how often replicas re-read the alias they serve (0: only on reconfigure)")
    feature_store: str | None = Field(
        None, description="Redis URL of the online feature store (ctr behaviour features); password in $RAY_APP_REDIS_PASSWORD"
    )
    runtime: str = Field("auto", pattern="^(auto|torch|onnx)$", description="CPU replicas: onnx, torch, or auto (onnx where exported)")
    onnx_precision: str = Field("auto", pattern="^(auto|fp32|int8)$", description="auto: the int8 text export where register accepted it")
    release: ReleaseConfig | None = Field(None, description="a canary or shadow release of a candidate version (see README)")
    blocking: bool = Field(False, description="keep serving until interrupted")


class TuneConfig(_Section):
    """A Ray Tune sweep over the train stage's own loop (``ray-app <workload> tune``)."""

    name: str = Field("tune", description="sweep name; re-running the same name resumes an interrupted sweep (Tuner.restore)")
    num_samples: int = Field(4, gt=0, description="configurations drawn from the search space (each grid is crossed with them)")
    epochs: int = Field(3, gt=0, description="epochs for a trial that is never stopped early (ASHA max_t)")
    grace_period: int = Field(1, gt=0, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2, gt=1, description="ASHA keeps the best 1/reduction_factor of trials at each rung")
    metric: str = Field("val_accuracy", description="validation metric ASHA and the choice of the best trial use")
    mode: str = Field("max", pattern="^(max|min)$")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="default: as many as the cluster's CPUs allow (at least 1 CPU left for Ray Data)"
    )
    # Per-key spaces: {"grid": [...]}, {"choice": [...]}, {"loguniform": [lo, hi]}, {"uniform": [lo, hi]}.
    # Keys: lr, weight_decay, batch_size, or a workload option (width, embedding_dim...). Unset keys
    # take the workload's default space (ray_app.engine.tune.DEFAULT_SEARCH_SPACES).
    search_space: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="YAML/JSON map of key -> {grid|choice|loguniform|uniform: [...]}"
    )
    seed: int = Field(0, description="seed of the random search")
    register_best: bool = Field(True, description="evaluate the best trial and register it through the promotion gate")

    @field_validator("search_space", mode="before")
    @classmethod
    def _search_space(cls, value: Any) -> Any:
        # The CLI hands the flag's text over as is (a one-item list: the flag takes nargs): YAML or JSON.
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        return yaml.safe_load(value) if isinstance(value, str) else value


class TrackingConfig(_Section):
    """MLflow tracking of train, evaluate, register and tune."""

    uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<workspace>/mlflow.db for a local workspace)"
    )
    enabled: bool = Field(True, description="log runs to MLflow")
    experiment: str | None = Field(None, description="MLflow experiment (default: ray_app-<workload>)")


class AppConfig(_Section):
    workload: str
    workspace: str = Field("./workspace", description="root URI for prepared data, runs, models, predictions")
    models: str | None = Field(None, description="model registry URI (default: <workspace>/models)")
    address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS or a local instance")
    options: dict[str, Any] = Field(default_factory=dict, description="workload-specific options")
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registration: RegisterConfig = RegisterConfig()
    rollback: RollbackConfig = RollbackConfig()
    predict: PredictConfig = PredictConfig()
    serve: ServeConfig = ServeConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    # Derived locations: one place decides the workspace layout.
    def prepared_uri(self) -> str:
        return storage.normalize(self.prepare.output or storage.join(self.workspace, self.workload, "prepared"))

    def train_data_uri(self) -> str:
        return storage.normalize(self.train.data or self.prepared_uri())

    def runs_uri(self) -> str:
        return storage.normalize(storage.join(self.workspace, self.workload, "runs"))

    def run_uri(self) -> str:
        return storage.join(self.runs_uri(), self.train.run_name)

    def models_uri(self) -> str:
        return storage.normalize(self.models or storage.join(self.workspace, "models"))

    def evaluation_uri(self) -> str:
        return storage.normalize(self.evaluate.output or storage.join(self.run_uri(), "evaluation"))

    def predictions_uri(self) -> str:
        return storage.normalize(self.predict.output or storage.join(self.workspace, self.workload, "predictions"))


def set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def workload_defaults(workload: str) -> dict[str, Any]:
    """The workload's own defaults as a config tree (``{"serve": {"min_replicas": 0}, ...}``)."""
    from ray_app.workloads import get_workload

    tree: dict[str, Any] = {}
    for key, value in get_workload(workload).default_config.items():
        set_dotted(tree, key, value)
    return tree


def serve_config(workload: str, values: dict[str, Any] | None = None) -> ServeConfig:
    """A workload's serve settings: ``ServeConfig`` defaults < the workload's defaults < ``values``.
    Serve config files (``build_app``) resolve through this; ``load_config`` builds the same tree."""
    return ServeConfig.model_validate({**workload_defaults(workload).get("serve", {}), **(values or {})})


def load_config(workload: str, path: str | None = None, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Build the config: YAML file (optional) then ``{"train.epochs": 3, ...}`` overrides."""
    tree = workload_defaults(workload)
    from_file = (yaml.safe_load(storage.read_bytes(path)) or {}) if path else {}
    for key, value in from_file.items():  # sections merge over the workload's defaults
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    tree["workload"] = workload
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    return AppConfig.model_validate(tree)


def save_config(config: AppConfig, folder_uri: str, stage: str) -> None:
    storage.write_bytes(
        storage.join(folder_uri, f"config.{stage}.yaml"),
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode(),
    )
