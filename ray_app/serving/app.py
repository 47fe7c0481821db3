"""The serving application: a ``Gateway`` ingress (HTTP, auth, limits, metrics, page) and one
``ModelServer`` deployment per workload, joined by deployment handles.

``build_app(args)`` is the import path for Serve config files (``serve run`` / ``serve deploy``):
``cluster/serve/app.yaml`` hosts every workload under its own prefix; the per-workload files (and
``ray-app <workload> serve``) host one.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve import Application

from ray_app import storage
from ray_app.config import AppConfig, ServeConfig
from ray_app.serving.gateway import AppSettings, Gateway, GatewayConfig
from ray_app.serving.loaders import ModelLoader, RegistryLoader
from ray_app.serving.model_server import ModelServer

log = logging.getLogger(__name__)


class ServeSettings(ServeConfig):
    """Arguments of a one-workload app: the serve section of the config plus which workload and
    registry; the same keys work in a Serve config file's ``args``."""

    workload: str = "image"
    models: str = Field("./workspace/models", description="model registry URI")
    allow_unauthenticated: bool = Field(False, description="serve without an API key (otherwise one is required)")


def app_settings(args: dict[str, Any]) -> AppSettings:
    """Either form of ``args``: ``{workloads: {name: serve settings}, ...}`` or one workload's flat settings."""
    if "workloads" in args:
        return AppSettings.model_validate(args)
    single = ServeSettings.model_validate(args)
    return AppSettings(
        models=single.models,
        workloads={single.workload: ServeConfig.model_validate(single.model_dump(exclude={"workload", "models", "allow_unauthenticated"}))},
        gateway=GatewayConfig(allow_unauthenticated=single.allow_unauthenticated),
    )


def model_deployment(workload: str, s: ServeConfig, loader: ModelLoader) -> Application:
    return ModelServer.options(
        name=f"{workload}-model",
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
            "metrics_interval_s": s.metrics_interval_s,
        },
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        # The model to serve is runtime config: changing it reconfigures replicas in place.
        user_config={"model": s.model},
    ).bind(workload, s, loader)


def build_app(args: dict[str, Any], loaders: dict[str, ModelLoader] | None = None) -> Application:
    """Serve config entry point (``import_path: ray_app.serving.app:build_app``). ``loaders``
    (Python callers only) replaces the registry loader of the workloads it names, e.g. with
    ``InMemoryLoader`` models in contract tests."""
    settings = app_settings(args)
    # Resolved here, in the process that reads the config, so replicas need not share its cwd.
    settings.models = storage.normalize(settings.models)
    g = settings.gateway
    loaders = loaders or {}
    models = {
        name: model_deployment(name, s, loaders.get(name) or RegistryLoader(settings.models)) for name, s in settings.workloads.items()
    }
    return Gateway.options(
        autoscaling_config={
            "min_replicas": g.min_replicas,
            "max_replicas": g.max_replicas,
            "target_ongoing_requests": g.target_ongoing_requests,
        },
        max_ongoing_requests=g.max_ongoing_requests,
        max_queued_requests=g.max_queued_requests,
        ray_actor_options={"num_cpus": g.num_cpus},
    ).bind(settings.model_dump(), models)


def settings_from_config(config: AppConfig) -> dict[str, Any]:
    """A one-workload app from the CLI's config. Bound to loopback it is open (a developer's own
    machine); bound anywhere else it needs a key ($RAY_APP_API_KEY), like the shipped configs."""
    s = config.serve
    return {"workload": config.workload, "models": config.models_uri(), **s.model_dump(), "allow_unauthenticated": is_loopback(s.host)}


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
    endpoint = f"http://{s.host}:{s.port}{route_prefix}"
    summary = {"endpoint": f"{endpoint}/predict", "health": f"{endpoint}/healthz", "docs": f"{endpoint}/docs"}
    log.info("serve: %s", summary)
    return summary
