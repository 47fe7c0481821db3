"""The HTTP ingress of the serving app: one small CPU deployment in front of the model deployments.

It owns everything that is about HTTP rather than a model — API keys, body limits, multipart,
routing by workload, time limits and backpressure (fast 503s), retries when a model replica dies
mid-request, request metrics, health, the model list, OpenAPI docs and the try-it page — and
talks to each workload's ``ModelServer`` through a deployment handle, so the two scale apart.
Models (and the preprocessing that belongs to their version) stay in the model deployments.
"""

import asyncio
import collections
import hashlib
import hmac
import importlib.resources
import logging
import os
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from ray_app import warm_workers
from ray_app.config import DeploymentScaling, ServeConfig
from ray_app.registry_store import RegistryError
from ray_app.serving.console import dicom_preview_png, registry_record
from ray_app.serving.http import RequestError, error_response, read_body
from ray_app.serving.metrics import GatewayMetrics
from ray_app.serving.release import ReleaseMetrics, ReleaseRouter

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log file

WorkloadName = Literal["image", "text", "ctr"]
# A replica that dies mid-request (scale-down, node loss, a crash) costs a retry, not a failure:
# inference is idempotent. But the request itself may be what killed it (a decode or forward pass
# that runs out of memory): so it is retried on at most one more replica, and a body that was in
# flight at two replica deaths is refused from then on instead of taking down the fleet.
REPLICA_LOST = RayActorError
MAX_REPLICAS_PER_REQUEST = 2
SUSPECTS_REMEMBERED = 1024
# Readiness probes of the model deployments: a probe queued behind predictions for this long is
# "busy", not "down" (the last answer stands), so load never makes a load balancer drop the app.
READY_PROBE_S = 2.0

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": 'image: raw bytes or multipart \'file\'; text: {"texts": [...]}; ctr: one event or {"events": [...]}. '
        "GET /v1/models shows each model's exact schema.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}
PREVIEW_BODY = {
    "requestBody": {
        "required": True,
        "description": "a DICOM file (raw bytes or multipart 'file'); answered with a PNG of its pixels",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}


# Every error the gateway answers, documented in the OpenAPI schema (schema fuzzers check that an
# answer's status is one the schema lists), all with the one JSON shape of ``error_response``.
ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {"status": {"type": "integer"}, "message": {"type": "string"}}}},
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    for code, description in (
        (400, "empty or malformed body"),
        (401, "missing API key (or none configured)"),
        (403, "API key not accepted"),
        (404, "workload not served here"),
        (408, "body not received within body_timeout_s"),
        (413, "body over max_body_bytes"),
        (422, "invalid input, too many items, or a request that crashed model replicas"),
        (500, "model error"),
        (503, "at capacity, no answer in time, or unavailable (Retry-After)"),
    )
}


# Defined above the Gateway class: Serve serializes that class by value when its decorator runs
# (the module attribute is the deployment, not the class), so every module-level name its methods
# use must already exist at that point.
def handle_made_here(handle: DeploymentHandle) -> DeploymentHandle:
    """A handle to the same deployment with this process's defaults. Why: a handle bound in the
    deploying driver keeps the transport Serve chose there (``RAY_SERVE_USE_GRPC_BY_DEFAULT``, read
    when Serve is imported), while the gateway runs on the cluster, whose settings may differ: a
    driver started without the fast-path variables made every gateway-to-model call take the actor
    path (about 1.9 ms at c=1) on a cluster set up for gRPC (about 1.1 ms)."""
    return serve.get_deployment_handle(handle.deployment_name, app_name=handle.app_name)


class ReplicasLost(RequestError):
    """Every replica a call was tried on died while running it."""

    def __init__(self, deaths: int) -> None:
        super().__init__(503, f"model replicas kept failing ({deaths}); retry later", {"Retry-After": "1"})
        self.deaths = deaths


class GatewayConfig(DeploymentScaling):
    """The ingress deployment: small (no torch), always on, and the place where auth is enforced.
    It scales like a model deployment (the same settings), with defaults of its own."""

    min_replicas: int = Field(1, ge=1, description="kept >= 1 so a scaled-to-zero model still has someone to wake it")
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(32, gt=0)
    max_ongoing_requests: int = Field(256, gt=0)
    max_queued_requests: int = Field(512, description="-1: no limit; beyond it the proxy answers 503")
    num_cpus: float = Field(0.25, ge=0)
    api_key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of accepted API keys (no secrets in configs)")
    api_key_env: str = Field(
        "RAY_APP_API_KEY", description="an API key in this environment variable (on the gateway's node) is accepted too"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve inference routes without any key; otherwise, with no key configured they answer 401"
    )
    body_timeout_s: float = Field(10.0, gt=0, description="a request body not fully received in time gets a 408")


class AppSettings(BaseModel):
    """Arguments of the serving app (``build_app``): the registry, the workloads it hosts, the gateway."""

    models: str = Field("./workspace/models", description="model registry URI")
    workloads: dict[WorkloadName, ServeConfig]
    gateway: GatewayConfig = GatewayConfig()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


api = FastAPI(
    title="ray_app inference",
    description="Image, text and click models served by Ray Serve. Send `Authorization: Bearer <key>` when an API key is configured.",
)


# Every error, FastAPI's own included (unknown route, bad path parameter), has one JSON shape.
@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return error_response(422, f"{where}: {first['msg']}")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        settings: dict[str, Any],
        models: dict[str, DeploymentHandle],
        candidates: dict[str, DeploymentHandle] | None = None,
        release_judge: DeploymentHandle | None = None,
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.models = {name: handle_made_here(handle) for name, handle in models.items()}
        # Workloads with a canary or shadow release: their candidate's deployment and the router
        # that picks a version per request (``ray_app.serving.release``).
        self.candidates = {name: handle_made_here(handle) for name, handle in (candidates or {}).items()}
        release_judge = handle_made_here(release_judge) if release_judge is not None else None
        release_metrics = ReleaseMetrics() if self.candidates else None
        self.releases = {
            name: ReleaseRouter(name, self.settings.workloads[name], release_judge, release_metrics) for name in self.candidates
        }
        env_key = os.environ.get(self.settings.gateway.api_key_env, "")
        self.key_digests = set(self.settings.gateway.api_key_sha256) | ({key_digest(env_key)} if env_key else set())
        if not self.key_digests and not self.settings.gateway.allow_unauthenticated:
            log.error(
                "no API key configured (api_key_sha256 or $%s): inference routes answer 401 until one is, "
                "or allow_unauthenticated: true is set",
                self.settings.gateway.api_key_env,
            )
        self.metrics = GatewayMetrics()
        self.page = importlib.resources.files("ray_app.serving").joinpath("page.html").read_text()
        # Body digest -> replica deaths it was in flight at (bounded, oldest forgotten first).
        self.suspects: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.model_states: dict[str, dict[str, Any]] = {}
        if any(limits.min_replicas == 0 for limits in self.settings.workloads.values()):
            # A model that wakes from zero starts warm on a spare worker; keep one on this node.
            warm_workers.keep_a_spare_from_now_on()

    # ---- open routes ------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_it_page(self) -> str:
        return self.page

    @api.get("/livez")
    async def livez(self) -> dict[str, str]:
        """Liveness: this gateway's event loop answers. Never calls a model, so it cannot wait
        behind predictions; a load balancer that drops on it drops only a wedged gateway."""
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: every model that should be running has a replica with its model loaded, and
        no replica reports a stale model (a failed alias poll) or a failed load. A model scaled to
        zero counts as ready (it loads on its first request) and is not woken."""
        names = [n for n, limits in self.settings.workloads.items() if limits.min_replicas > 0]
        probed = await asyncio.gather(*(self._probe(name) for name in names))
        states: dict[str, Any] = {n: "scaled to zero until requested" for n in self.settings.workloads if n not in names}
        states.update(zip(names, probed, strict=True))
        ready = all(not isinstance(state, dict) or state["ready"] for state in states.values())
        summary = {n: (state["state"] if isinstance(state, dict) else state) for n, state in states.items()}
        problems = {n: state["problem"] for n, state in states.items() if isinstance(state, dict) and state.get("problem")}
        content = {"status": "ok" if ready else "not ready", "models": summary, **({"problems": problems} if problems else {})}
        return JSONResponse(status_code=200 if ready else 503, content=content)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Readiness under its historical name (``/readyz``); liveness is ``/livez``."""
        return await self.readyz()

    async def _probe(self, name: str) -> dict[str, Any]:
        try:
            answer = await asyncio.wait_for(self._call(name, "ready"), timeout=READY_PROBE_S)
            # ``ModelServer.ready``: {"loaded", "stale", "problem"} (a bare bool from older replicas).
            health = answer if isinstance(answer, dict) else {"loaded": bool(answer)}
        except asyncio.TimeoutError:
            # Queued behind predictions: busy, not down. The last answer stands (loading at first).
            last = self.model_states.get(name, {"ready": False, "state": "loading"})
            return {**last, "state": f"{last['state']} (busy)"}
        except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
            health = {"loaded": False, "problem": f"{type(exc).__name__}"}
        if not health.get("loaded"):
            state = {"ready": False, "state": "failed" if health.get("problem") else "loading", "problem": health.get("problem")}
        elif health.get("stale"):
            state = {"ready": False, "state": "stale", "problem": health.get("problem")}
        else:
            state = {"ready": True, "state": "loaded", "problem": None}
        self.model_states[name] = state
        return state

    # ---- routes behind the API key --------------------------------------------------------
    @api.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(self, request: Request) -> Any:
        """What each workload serves: version, alias, metrics, request schema (wakes scaled-to-zero models)."""
        try:
            self._authorize(request)
            described = await asyncio.gather(*(self._call(name, "describe") for name in self.models))
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)
        return {"models": described}

    @api.get("/{workload}/model", responses=ERROR_RESPONSES)
    async def model_info(self, workload: WorkloadName, request: Request) -> Any:
        try:
            self._authorize(request)
            return await self._call(workload, "describe")
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)

    # ---- the model console (the page): registry record and DICOM preview --------------------
    @api.get("/v1/models/{workload}/history")
    async def model_history(self, workload: WorkloadName, request: Request) -> Any:
        """The registry's record of a workload: each version's card (when and from which data it
        was trained, its metrics) and every alias move. Read from the registry, no model called."""
        try:
            self._authorize(request)
            self._limits(workload)
            return await asyncio.to_thread(registry_record, self.settings.models, workload)
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)
        except (OSError, ValueError, RegistryError) as exc:  # the served models keep answering meanwhile
            return error_response(503, f"{workload}: model registry unreadable ({type(exc).__name__})", {"Retry-After": "5"})

    @api.post("/v1/preview", openapi_extra=PREVIEW_BODY, response_class=Response)
    async def preview(self, request: Request) -> Response:
        """An uploaded DICOM file as a PNG, for the page to show what was sent."""
        try:
            self._authorize(request)
            payload = await read_body(request, self._limits("image").max_body_bytes, self.settings.gateway.body_timeout_s)
            try:
                png = await asyncio.to_thread(dicom_preview_png, payload)
            except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decode failure is the file's, said as 422
                raise RequestError(422, f"no preview: {exc}") from None
            return Response(content=png, media_type="image/png")
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)

    @api.post("/{workload}/predict", openapi_extra=PREDICT_BODY, responses=ERROR_RESPONSES)
    async def predict(self, workload: WorkloadName, request: Request) -> Any:
        started, status = time.perf_counter(), 500
        try:
            self._authorize(request)
            limits = self._limits(workload)
            payload = await read_body(request, limits.max_body_bytes, self.settings.gateway.body_timeout_s)
            answer = (
                await self._released_predict(workload, payload, request)
                if workload in self.releases
                else await self._predict(workload, payload)
            )
            if answer["status"] != 200:
                raise RequestError(answer["status"], answer["message"])
            status = 200
            return answer["body"]
        except RequestError as exc:
            status = exc.status_code
            return error_response(exc.status_code, exc.message, exc.headers)
        finally:
            self.metrics.observe(workload, status, (time.perf_counter() - started) * 1000)

    # ---- online state: events that update it, and erasure ---------------------------------
    @api.post("/{workload}/events", openapi_extra=PREDICT_BODY, responses=ERROR_RESPONSES)
    async def events(self, workload: WorkloadName, request: Request) -> Any:
        """Events with their outcome (ctr: a click or not) that update the online behaviour
        history the next predictions read. Idempotent per event id: retry freely."""
        try:
            self._authorize(request)
            limits = self._limits(workload)
            payload = await read_body(request, limits.max_body_bytes, self.settings.gateway.body_timeout_s)
            return self._state_answer(await self._call(workload, "events", payload))
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)

    @api.delete("/{workload}/users/{user_id}", responses=ERROR_RESPONSES)
    async def purge_user(self, workload: WorkloadName, user_id: str, request: Request) -> Any:
        """Forget one user's online state (an erasure request)."""
        try:
            self._authorize(request)
            self._limits(workload)
            return self._state_answer(await self._call(workload, "purge", user_id))
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)

    @staticmethod
    def _state_answer(answer: dict[str, Any]) -> Any:
        if answer["status"] == 503:
            raise RequestError(503, answer["message"], {"Retry-After": "1"})
        if answer["status"] != 200:
            raise RequestError(answer["status"], answer["message"])
        return answer["body"]

    # Single-workload apps (``ray-app <workload> serve``) live under /<workload>; Serve strips that
    # prefix, so their requests arrive here.
    @api.post("/predict", openapi_extra=PREDICT_BODY, include_in_schema=False)
    async def predict_only_workload(self, request: Request) -> Any:
        return await self.predict(self._only_workload(), request)

    @api.get("/model", include_in_schema=False)
    async def model_info_only_workload(self, request: Request) -> Any:
        return await self.model_info(self._only_workload(), request)

    @api.post("/events", include_in_schema=False)
    async def events_only_workload(self, request: Request) -> Any:
        return await self.events(self._only_workload(), request)

    @api.delete("/users/{user_id}", include_in_schema=False)
    async def purge_user_only_workload(self, user_id: str, request: Request) -> Any:
        return await self.purge_user(self._only_workload(), user_id, request)

    @api.get("/{workload}/release", responses=ERROR_RESPONSES)
    async def release_status(self, workload: WorkloadName, request: Request) -> Any:
        """A canary or shadow release: phase, per-version requests, errors and p99 in the judging
        window, shadow agreement, and the decisions taken."""
        try:
            self._authorize(request)
            self._limits(workload)
            if workload not in self.releases:
                raise RequestError(404, f"{workload} has no release configured (serve.release)")
            return await asyncio.wait_for(self.releases[workload].judge.status.remote(workload), timeout=READY_PROBE_S)
        except RequestError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)
        except Exception as exc:  # noqa: BLE001 - the judge busy or restarting: predictions are unaffected
            return error_response(503, f"{workload}: release judge unavailable ({type(exc).__name__})", {"Retry-After": "1"})

    @api.get("/release", include_in_schema=False)
    async def release_status_only_workload(self, request: Request) -> Any:
        return await self.release_status(self._only_workload(), request)

    # ---- helpers --------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.key_digests:
            if self.settings.gateway.allow_unauthenticated:
                return
            # Closed by default: a config that forgot its key must not serve the world.
            raise RequestError(
                401,
                f"no API key is configured on this server: set ${self.settings.gateway.api_key_env} or "
                "gateway.api_key_sha256 (or gateway.allow_unauthenticated: true)",
                {"WWW-Authenticate": "Bearer"},
            )
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.headers.get("x-api-key", "")
        if not key:
            raise RequestError(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
        offered = key_digest(key)
        if not any(hmac.compare_digest(offered, digest) for digest in self.key_digests):
            raise RequestError(403, "API key not accepted")

    def _limits(self, workload: str) -> ServeConfig:
        if workload not in self.models:
            raise RequestError(404, f"workload {workload!r} is not served here; served: {sorted(self.models)}")
        return self.settings.workloads[workload]

    def _only_workload(self) -> str:
        return next(iter(self.models)) if len(self.models) == 1 else "none"

    async def _predict(self, workload: str, payload: bytes) -> dict[str, Any]:
        """A prediction, with the poison-pill guard: a body that was in flight when replicas died
        is tried on at most ``MAX_REPLICAS_PER_REQUEST`` replicas, and refused once it has been."""
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        if self.suspects.get(digest, 0) >= MAX_REPLICAS_PER_REQUEST:
            raise RequestError(422, f"this request was in flight when {MAX_REPLICAS_PER_REQUEST} model replicas died; it is not run again")
        try:
            return await self._call(workload, "predict", payload, max_attempts=MAX_REPLICAS_PER_REQUEST)
        except ReplicasLost as lost:
            self.suspects[digest] = self.suspects.pop(digest, 0) + lost.deaths
            while len(self.suspects) > SUSPECTS_REMEMBERED:
                self.suspects.popitem(last=False)
            log.error("%s: a request was in flight at %d replica deaths; not retrying it", workload, lost.deaths)
            raise RequestError(422, f"this request was in flight when {lost.deaths} model replicas died; it is not run again") from None

    async def _released_predict(self, workload: str, payload: bytes, request: Request) -> dict[str, Any]:
        """A prediction of a workload under release: the router picks stable or candidate (or
        mirrors to the candidate); a candidate call is tried once, on the candidate's own deadline."""
        release = self.settings.workloads[workload].release

        def candidate() -> Any:
            return self._call(
                workload, "predict", payload, max_attempts=1, handle=self.candidates[workload], timeout_s=release.candidate_timeout_s
            )

        return await self.releases[workload].predict(request.headers, lambda: self._predict(workload, payload), candidate)

    async def _call(
        self,
        workload: str,
        method: str,
        *args: Any,
        max_attempts: int = 3,
        handle: DeploymentHandle | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One call to a workload's model deployment (or ``handle``, its release candidate), bounded
        in time, with overload as a 503 and a replica lost mid-request retried on another one (up
        to ``max_attempts`` replicas)."""
        limits = self._limits(workload)
        timeout_s = min(timeout_s or limits.request_timeout_s, limits.request_timeout_s)
        handle = handle or self.models[workload]
        for attempt in range(1, max_attempts + 1):
            response = getattr(handle, method).remote(*args)
            try:
                return await asyncio.wait_for(response, timeout=timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise RequestError(503, f"no answer within {timeout_s:g} s; retry later", {"Retry-After": "1"}) from None
            except BackPressureError:
                raise RequestError(503, f"{workload} is at capacity; retry later", {"Retry-After": "1"}) from None
            except DeploymentUnavailableError as exc:
                raise RequestError(503, f"{workload} is unavailable: {exc}", {"Retry-After": "5"}) from None
            except RayTaskError:
                log.exception("%s: %s failed inside the model replica", workload, method)
                raise RequestError(500, f"{workload}: internal error while running the model") from None
            except REPLICA_LOST:
                if attempt == max_attempts:
                    raise ReplicasLost(attempt) from None
                log.warning("%s: replica lost during %s, retrying (attempt %d)", workload, method, attempt)
        raise AssertionError("unreachable")
