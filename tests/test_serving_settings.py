"""Serving without Ray: what the model server imports, and how each entry point resolves settings.

``ray-app <workload> serve`` and ``serve run cluster/serve/<workload>.yaml`` must serve a workload
with the same settings: both resolve ServeConfig defaults < the workload's defaults < what they were
given, and the config files hold only what differs from those defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from ray_app import storage
from ray_app.cli import build_parser, parse_overrides
from ray_app.config import ServeConfig, load_config, serve_config
from ray_app.serving.app import app_settings, build_app, settings_from_config
from ray_app.serving.gateway import GatewayConfig
from ray_app.workloads import names

SERVE_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "cluster", "serve")


def file_config(name: str) -> dict:
    with open(os.path.join(SERVE_CONFIGS, name)) as f:
        return yaml.safe_load(f)


def cli_settings(*argv: str):
    """What ``ray-app <argv>`` resolves, the way ``run_cli`` does it (without starting anything)."""
    args = build_parser().parse_args(list(argv))
    return settings_from_config(load_config(args.workload, args.config, parse_overrides(args)))


def test_model_server_and_app_import_no_torch():
    """A replica given a torch-free loader (e.g. ONNX) must not pay for torch: only loaders import it."""
    probe = "import sys, ray_app.serving.app, ray_app.serving.model_server; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("workload", names())
def test_cli_and_serve_config_file_resolve_identical_settings(workload):
    config = file_config(f"{workload}.yaml")
    (app,) = config["applications"]
    from_file = app_settings(app["args"])
    from_cli = cli_settings(workload, "serve")
    assert from_file.workloads == from_cli.workloads  # every ServeConfig field, for this workload
    assert storage.normalize(from_file.models) == from_cli.models
    served = from_cli.workloads[workload]
    assert (config["http_options"]["host"], config["http_options"]["port"]) == (served.host, served.port)
    assert app["route_prefix"] == (served.route_prefix or f"/{workload}")


@pytest.mark.parametrize("workload", names())
def test_workload_defaults_reach_every_entry_point(workload):
    """The workload's own serve defaults (e.g. ctr scales to zero) apply to the CLI, a one-workload
    config file and each section of the combined app alike."""
    defaults = serve_config(workload)
    assert cli_settings(workload, "serve").workloads[workload] == defaults
    assert app_settings({"workload": workload}).workloads[workload] == defaults
    assert app_settings({"workloads": {workload: {}}}).workloads[workload] == defaults
    assert app_settings({"workloads": {workload: {"max_replicas": 7}}}).workloads[workload] == defaults.model_copy(
        update={"max_replicas": 7}
    )
    # A CLI flag and the same key in a config file land on the same value.
    flagged = cli_settings(workload, "serve", "--max-batch-size", "5").workloads[workload]
    assert flagged == app_settings({"workload": workload, "max_batch_size": 5}).workloads[workload]
    assert flagged.max_batch_size == 5


def test_ctr_defaults_are_the_serverless_ones():
    ctr = serve_config("ctr")
    assert (ctr.min_replicas, ctr.batch_wait_timeout_s, ctr.max_items_per_request, ctr.max_batch_size) == (0, 0.0, 256, 64)
    assert ctr.downscale_delay_s == 60


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(SERVE_CONFIGS) if n.endswith(".yaml")))
def test_serve_config_files_hold_only_what_differs_from_the_defaults(name):
    (app,) = file_config(name)["applications"]
    args = app["args"]
    sections = args["workloads"] if "workloads" in args else {args["workload"]: args}
    for workload, values in sections.items():
        defaults = serve_config(workload).model_dump()
        repeated = {key: value for key, value in values.items() if key in ServeConfig.model_fields and defaults[key] == value}
        assert not repeated, f"{name}: {workload} repeats its defaults {repeated}"
    gateway_defaults = GatewayConfig().model_dump()
    scaling = set(ServeConfig.model_fields) & set(GatewayConfig.model_fields)  # the shared scaling model
    repeated = {key: value for key, value in args.get("gateway", {}).items() if key in scaling and gateway_defaults[key] == value}
    assert not repeated, f"{name}: gateway repeats its defaults {repeated}"


def test_deployments_receive_the_resolved_settings_objects():
    """Settings are validated once: the model deployment is bound to the resolved ServeConfig and
    its Serve options come from the same object (one scaling model for gateway and models)."""
    settings = cli_settings("ctr", "serve")
    app = build_app(settings)
    gateway = app._bound_deployment
    bound_settings, models = gateway.init_args
    assert bound_settings.workloads["ctr"] is settings.workloads["ctr"]
    model = models["ctr"]._bound_deployment
    workload, served, _loader = model.init_args
    assert workload == "ctr" and served is settings.workloads["ctr"]
    autoscaling = model._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.downscale_delay_s, autoscaling.max_replicas) == (0, 60, served.max_replicas)
    assert model.max_ongoing_requests == served.max_ongoing_requests
    assert gateway.max_ongoing_requests == settings.gateway.max_ongoing_requests
    assert gateway._deployment_config.autoscaling_config.min_replicas == settings.gateway.min_replicas == 1
    # A stopping replica checks for in-flight requests every 0.5 s, not Ray's 2 s: each scale-down,
    # redeploy and delete waited at least one loop per replica.
    # A crashed replica (OOM kill, segfault) is seen on the controller's next health check: every
    # 2 s, not Ray's 10 s, so its replacement starts up to 8 s sooner.
    for deployment in (model, gateway):
        assert deployment._deployment_config.graceful_shutdown_wait_loop_s == 0.5
        assert deployment._deployment_config.health_check_period_s == 2.0
