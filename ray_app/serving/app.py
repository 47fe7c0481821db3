"""The serving application: a ``Gateway`` ingress (HTTP, auth, limits, metrics, page) and one
``ModelServer`` deployment per workload, joined by deployment handles.

``build_app(args)`` is the import path for Serve config files (``serve run`` / ``serve deploy``):
``cluster/serve/app.yaml`` hosts every workload under its own prefix; the per-workload files (and
``ray-app <workload> serve``) host one.

Settings resolve one way whatever the entry point: ``ServeConfig`` defaults < the workload's own
defaults (``Workload.default_config``) < the config file's ``args`` or the CLI's flags
(``ray_app.config.serve_config`` / ``load_config``). They are validated once, into ``AppSettings``,
and the deployments receive those objects, not dicts to validate again.
"""

from __future__ import annotations

import ipaddress
import logging
import warnings
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve import Application, Deployment

from ray_app import storage, warm_workers
from ray_app.config import AppConfig, DeploymentScaling, ServeConfig, serve_config
from ray_app.serving.gateway import AppSettings, Gateway, GatewayConfig
from ray_app.serving.loaders import ModelLoader, RegistryLoader
from ray_app.serving.model_server import ModelServer
from ray_app.serving.release import ReleaseJudgeDeployment

log = logging.getLogger(__name__)


class ServeSettings(ServeConfig):
    """Arguments of a one-workload app: the serve section of the config plus which workload and
    registry; the same keys work in a Serve config file's ``args``."""

    workload: str = "image"
    models: str = Field("./workspace/models", description="model registry URI")
    allow_unauthenticated: bool = Field(False, description="serve without an API key (otherwise one is required)")


def app_settings(args: dict[str, Any] | AppSettings) -> AppSettings:
    """Either form of ``args``: ``{workloads: {name: serve settings}, ...}`` or one workload's flat
    settings. Each workload's settings start from that workload's defaults, as on the CLI."""
    if isinstance(args, AppSettings):
        return args
    if "workloads" in args:
        workloads = {name: serve_config(name, values) for name, values in (args["workloads"] or {}).items()}
        return AppSettings.model_validate({**args, "workloads": workloads})
    ServeSettings.model_validate(args)  # unknown or mistyped keys fail here, with every key named
    flat = dict(args)
    workload, models = flat.pop("workload", "image"), flat.pop("models", ServeSettings.model_fields["models"].default)
    gateway = GatewayConfig(allow_unauthenticated=flat.pop("allow_unauthenticated", False))
    return AppSettings(models=models, workloads={workload: serve_config(workload, flat)}, gateway=gateway)


def scaled(deployment: Deployment, scaling: DeploymentScaling, **options: Any) -> Deployment:
    """``deployment`` with its scaling and admission settings (and any other ``options``)."""
    with warnings.catch_warnings():
        # Ray 2.60 marks AutoscalingConfig.metrics_interval_s deprecated in favour of environment
        # variables it does not read yet: the field still sets how often replicas report load, and
        # a short interval is what brings a scaled-to-zero model up in ~3 s instead of ~9 s.
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*deprecated", category=DeprecationWarning)
        return deployment.options(**scaling.deployment_options(), **options)


def model_deployment(workload: str, s: ServeConfig, loader: ModelLoader) -> Application:
    # The model to serve is runtime config: changing it reconfigures replicas in place.
    return scaled(ModelServer, s, name=f"{workload}-model", user_config={"model": s.model}).bind(workload, s, loader)


def candidate_deployment(workload: str, s: ServeConfig, loader: ModelLoader) -> Application:
    """A release's candidate: the same class, loader and scaling as the stable model, its own
    deployment (Serve splits no traffic between versions of one deployment; the gateway does)."""
    return scaled(ModelServer, s, name=f"{workload}-candidate", user_config={"model": s.release.candidate}).bind(workload, s, loader)


def build_app(args: dict[str, Any] | AppSettings) -> Application:
    """Serve config entry point (``import_path: ray_app.serving.app:build_app``); Python callers may
    pass resolved ``AppSettings``. Exactly one parameter: ``serve deploy``/``serve run`` refuse a
    builder with any other (even an optional one), so injected loaders go through ``compose_app``."""
    return compose_app(args)


def compose_app(args: dict[str, Any] | AppSettings, loaders: dict[str, ModelLoader] | None = None) -> Application:
    """``build_app`` for Python callers: ``loaders`` replaces the registry loader of the workloads it
    names, e.g. with ``InMemoryLoader`` models in contract tests."""
    # Resolved here, in the process that reads the config, so replicas need not share its cwd.
    settings = app_settings(args).model_copy()
    settings.models = storage.normalize(settings.models)
    loaders = loaders or {}
    models = {
        name: model_deployment(name, s, loaders.get(name) or RegistryLoader(settings.models, s.runtime, s.onnx_precision))
        for name, s in settings.workloads.items()
    }
    released = {name: s for name, s in settings.workloads.items() if s.release is not None}
    if not released:
        return scaled(Gateway, settings.gateway).bind(settings, models)
    candidates = {
        # The candidate loads the way the stable model does (same runtime), so the two are compared fairly.
        name: candidate_deployment(name, s, loaders.get(name) or RegistryLoader(settings.models, s.runtime, s.onnx_precision))
        for name, s in released.items()
    }
    judge = ReleaseJudgeDeployment.bind(settings.models, released)
    return scaled(Gateway, settings.gateway).bind(settings, models, candidates, judge)


def settings_from_config(config: AppConfig) -> AppSettings:
    """A one-workload app from the CLI's config. Bound to loopback it is open (a developer's own
    machine); bound anywhere else it needs a key ($RAY_APP_API_KEY), like the shipped configs."""
    s = config.serve
    return AppSettings(
        models=config.models_uri(), workloads={config.workload: s}, gateway=GatewayConfig(allow_unauthenticated=is_loopback(s.host))
    )


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_http(s: ServeConfig, **http_options: Any) -> None:
    """Start Serve's HTTP proxy (a no-op when it is already running)."""
    serve.start(http_options={"host": s.host, "port": s.port, **http_options})


def run_serve(config: AppConfig) -> dict[str, Any]:
    """Start (or reuse) Serve on the configured host/port and deploy this workload's app."""
    s = config.serve
    if config.options:
        # Replicas decode with the model's recorded options: a flag that contradicts them is
        # refused here, before anything starts, instead of being silently ignored.
        from ray_app.engine.scoring import stage_options
        from ray_app.registry import resolve_model_uri

        stage_options(config.workload, "serve", config.options, resolve_model_uri(config.models_uri(), config.workload, s.model))
    start_http(s)
    route_prefix = s.route_prefix or f"/{config.workload}"
    serve.run(build_app(settings_from_config(config)), name=config.workload, route_prefix=route_prefix)
    if s.min_replicas == 0:
        # The model deployment starts at zero replicas: a spare worker on this node makes its first
        # scale-up a warm start (ray_app.warm_workers; a no-op where spares are not set up).
        warm_workers.keep_one_spare()
    endpoint = f"http://{s.host}:{s.port}{route_prefix}"
    summary = {"endpoint": f"{endpoint}/predict", "health": f"{endpoint}/healthz", "docs": f"{endpoint}/docs"}
    log.info("serve: %s", summary)
    return summary
