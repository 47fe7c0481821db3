"""Ray Serve deployment for any workload: a FastAPI ingress, the model loaded once per replica by
registry alias/version, ``@serve.batch`` dynamic batching, autoscaling, JSON 4xx for bad input.

``build_app(args)`` is the import path used by ``serve run`` / ``serve deploy`` config files.
"""

import asyncio
import logging
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from ray import serve
from ray.serve import Application

from ray_app import storage
from ray_app.bundle import load_bundle
from ray_app.config import AppConfig, ServeConfig
from ray_app.engine.scoring import pick_device
from ray_app.registry import resolve_model_uri
from ray_app.workloads.base import BadInput

log = logging.getLogger(__name__)

api = FastAPI(title="ray_app inference", description="Model endpoints served by Ray Serve.")


class RequestError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code, self.message = status_code, message


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"error": {"status": status_code, "message": message}})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request payload — raw body or the ``file`` field of a multipart form — within a limit
    enforced while streaming, so an oversized upload is refused without buffering it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _multipart_file(request, body)
    if not body:
        raise RequestError(400, "empty body: send the input as the request body or a multipart 'file' field")
    return body


async def _multipart_file(request: Request, body: bytes) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    async def replay():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay()).parse()
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed form
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "multipart body needs a 'file' field")
    return await upload.read()


class ServeSettings(ServeConfig):
    """Arguments of ``build_app``: the serve section of the config plus which workload and
    registry; the same keys work in a Serve config file's ``args``."""

    workload: str = "image"
    models: str = Field("./workspace/models", description="model registry URI")


@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        model_uri = resolve_model_uri(s.models, s.workload, s.model)
        self.bundle = load_bundle(model_uri, pick_device(s.num_gpus > 0))
        self.model_uri = storage.normalize(model_uri)
        self.top_k = min(s.top_k, len(self.bundle.classes))
        self.predict_batch.set_max_batch_size(s.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/model")
    async def model_info(self) -> dict[str, Any]:
        info = self.bundle.info
        return {
            "workload": self.settings.workload,
            "ref": self.settings.model,
            "version": info.get("version"),
            "uri": self.model_uri,
            "classes": self.bundle.classes,
            "metrics": info.get("metrics"),
        }

    @api.post("/predict")
    async def predict(self, request: Request) -> Any:
        b = self.bundle
        try:
            payload = await read_body(request, self.settings.max_body_bytes)
            decoded = b.workload.decode_request(payload, b.options, b.manifest)
            if len(decoded) > self.settings.max_items_per_request:
                raise BadInput(f"{len(decoded)} items in one request, at most {self.settings.max_items_per_request}")
        except RequestError as exc:
            return error_response(exc.status_code, exc.message)
        except BadInput as exc:
            return error_response(422, str(exc))
        # Each item joins the replica-wide batch on its own, so one request with many texts and
        # many single-item requests share forward passes alike.
        probabilities = await asyncio.gather(*(self.predict_batch(item) for item, _ in decoded))
        answer = b.workload.format_response(list(probabilities), [extras for _, extras in decoded], b.classes, self.top_k)
        return {"model": {"workload": self.settings.workload, "version": b.info.get("version")}, **answer}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[Any]) -> list[Any]:
        # One forward pass for every request that arrived within the batch window.
        b = self.bundle
        return list(b.predict_proba(b.workload.stack_items(items, b.options, b.manifest)))


def build_app(args: dict[str, Any]) -> Application:
    """Serve config entry point (``import_path: ray_app.serving.app:build_app``)."""
    s = ServeSettings.model_validate(args)
    # Resolved here, in the process that reads the config, so replicas need not share its cwd.
    s.models = storage.normalize(s.models)
    return ModelServer.options(
        name=f"{s.workload}-model",
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
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(s.model_dump())


def settings_from_config(config: AppConfig) -> dict[str, Any]:
    return {"workload": config.workload, "models": config.models_uri(), **config.serve.model_dump()}


def unused_loopback_port() -> int:
    """A 127.0.0.1 port nothing listens on now (tests and benchmarks never assume a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_serve(config: AppConfig) -> dict[str, Any]:
    """Start (or reuse) Serve on the configured host/port and deploy this workload's app."""
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    route_prefix = s.route_prefix or f"/{config.workload}"
    serve.run(build_app(settings_from_config(config)), name=config.workload, route_prefix=route_prefix)
    endpoint = f"http://{s.host}:{s.port}{route_prefix}"
    summary = {"endpoint": f"{endpoint}/predict", "health": f"{endpoint}/healthz", "docs": f"http://{s.host}:{s.port}{route_prefix}/docs"}
    log.info("serve: %s", summary)
    return summary
