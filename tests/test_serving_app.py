"""The one serving app (cluster/serve/app.yaml) hosting image, text and ctr behind a gateway: routes,
API keys, health, the model list, rollout under load with zero failed requests, backpressure,
metrics in Prometheus format, the model console page in a real browser, and schema fuzzing.

A contract test: the registry holds each workload's real architecture with untrained weights
(``small_models``), so no training run is needed; what trained models learn is the chain tests'."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pydicom.data
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from ray import serve
from schemathesis import GenerationMode
from small_models import card_metadata, small_bundle_uri, small_registry

from ray_app.demos.data import first_digit_file
from ray_app.registry import ModelRegistry
from ray_app.serving.app import build_app

APP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "cluster", "serve", "app.yaml")
API_KEY = secrets.token_urlsafe(16)  # made per run; only its digest goes into the app config
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _digit(demo_images: str, digit: str) -> bytes:
    with open(first_digit_file(demo_images, digit), "rb") as f:
        return f.read()


def app_args(models: str, **gateway) -> dict:
    """The shipped config's args, sized for 2 CPUs, with a per-run API key digest."""
    with open(APP_CONFIG) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    args["models"] = models
    args["gateway"].update(api_key_sha256=[hashlib.sha256(API_KEY.encode()).hexdigest()], **gateway)
    for workload in args["workloads"].values():
        workload.update(num_cpus=0.5, max_replicas=1, alias_poll_s=1)
    return args


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """One registry holding version 1 of an image, a text and a ctr model (untrained)."""
    return small_registry(str(tmp_path_factory.mktemp("registry")), run_name="contract")


@pytest.fixture(scope="module")
def base_url(session_serve, registry) -> str:
    url = session_serve.start()
    serve.run(build_app(app_args(registry)), name="ray_app", route_prefix="/")
    yield url
    for app in serve.status().applications:  # this module's apps, also those a failed test left
        if app in ("ray_app", "tight", "slow"):
            serve.delete(app)


def test_every_workload_answers_under_its_prefix(base_url, demo_images):
    image = requests.post(f"{base_url}/image/predict", data=_digit(demo_images, "4"), headers=AUTH, timeout=60)
    assert image.status_code == 200, image.text
    assert len(image.json()["predictions"]) == 3
    text = requests.post(f"{base_url}/text/predict", json={"texts": ["a lovely film", "awful"]}, headers=AUTH, timeout=60)
    assert text.status_code == 200, text.text
    assert [r["label"] in ("fresh", "rotten") for r in text.json()["results"]] == [True, True]
    click = requests.post(f"{base_url}/ctr/predict", json={"age": 31, "user": "u7"}, headers=AUTH, timeout=120)
    assert click.status_code == 200, click.text
    assert 0 < click.json()["click_probability"][0] < 1
    assert {image.json()["model"]["workload"], text.json()["model"]["workload"], click.json()["model"]["workload"]} == {
        "image",
        "text",
        "ctr",
    }


def test_api_key_is_required_on_inference_routes_but_not_on_health(base_url, demo_images):
    image = _digit(demo_images, "2")
    missing = requests.post(f"{base_url}/image/predict", data=image, timeout=30)
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    wrong = requests.post(f"{base_url}/image/predict", data=image, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 403
    assert requests.get(f"{base_url}/v1/models", timeout=30).status_code == 401
    assert requests.post(f"{base_url}/image/predict", data=image, headers={"X-API-Key": API_KEY}, timeout=30).status_code == 200
    assert requests.get(f"{base_url}/healthz", timeout=30).status_code == 200
    assert "model console" in requests.get(f"{base_url}/", timeout=30).text  # the page stays open: it holds no data


def test_health_and_model_list(base_url):
    health = requests.get(f"{base_url}/healthz", timeout=30).json()
    assert health["status"] == "ok"
    assert health["models"]["image"] == health["models"]["text"] == "loaded"
    listed = {m["workload"]: m for m in requests.get(f"{base_url}/v1/models", headers=AUTH, timeout=120).json()["models"]}
    assert set(listed) == {"image", "text", "ctr"}
    assert listed["image"]["version"] == listed["text"]["version"] == listed["ctr"]["version"] == 1
    assert listed["text"]["request_schema"]["required"] == ["texts"]
    assert "age" in listed["ctr"]["request_schema"]["anyOf"][0]["properties"]


def test_unknown_workload_and_bad_bodies_get_json_4xx(base_url):
    unknown = requests.post(f"{base_url}/audio/predict", data=b"x", headers=AUTH, timeout=30)
    assert unknown.status_code == 422  # not one of the workload names in the schema
    bad = requests.post(f"{base_url}/text/predict", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["status"] == 422
    huge = requests.post(f"{base_url}/ctr/predict", data=b"x" * 2_000_000, headers=AUTH, timeout=30)
    assert huge.status_code == 413


def test_alias_rollout_under_load_fails_no_request(base_url, registry, demo_images):
    """Requests keep flowing while the alias moves to version 2: every one is answered, and the
    answers switch from version 1 to version 2 once, never back."""
    image = _digit(demo_images, "8")
    answers: list[tuple[float, int, int | None]] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            r = session.post(f"{base_url}/image/predict", data=image, headers=AUTH, timeout=60)
            answers.append((time.monotonic(), r.status_code, r.json().get("model", {}).get("version") if r.ok else None))

    workers = [threading.Thread(target=client) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(1)
    root = os.path.dirname(registry)
    moved = ModelRegistry(registry).register(
        "image", small_bundle_uri(root, "image"), card_metadata(root, "image", "contract"), alias="production"
    )
    assert moved == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(v == 2 for _, _, v in answers[-10:]):
        time.sleep(0.2)
    time.sleep(1)  # a little more traffic on the new version
    stop.set()
    for w in workers:
        w.join()
    statuses = {s for _, s, _ in answers}
    versions = [v for _, _, v in sorted(answers)]
    assert statuses == {200}, f"{len(answers)} requests, statuses {statuses}"
    assert versions[0] == 1 and versions[-1] == 2 and len(answers) > 20
    switched_at = versions.index(2)
    # Concurrent clients can finish in any order around the switch; after it settles, only v2.
    assert set(versions[switched_at + 8 :]) == {2}


def test_overload_gets_a_fast_503_not_a_queue(base_url, registry, demo_images):
    """A second app whose gateway takes one request and queues one. Six clients send headers and
    never finish their bodies: at most two are admitted (one running, one queued), the rest get a
    503 at once instead of waiting; once the clients go away the app serves again."""
    args = app_args(registry, max_ongoing_requests=1, max_queued_requests=1, num_cpus=0)
    serve.run(build_app(args | {"workloads": {"image": {"num_cpus": 0.25}}}), name="tight", route_prefix="/tight")
    url = f"{base_url}/tight/image/predict"  # the same Serve proxy, another app
    held = [_hold_request(url) for _ in range(6)]
    try:
        # One 5 s window for all six: a refusal comes at once; an admitted request never answers.
        deadline = time.monotonic() + 5
        statuses = [_status_within(sock, seconds=max(0.01, deadline - time.monotonic())) for sock in held]
        # One runs; Serve's router may or may not count the next as queued: at most two are admitted.
        assert set(statuses) <= {None, 503} and 1 <= statuses.count(None) <= 2, statuses
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while requests.post(url, data=_digit(demo_images, "1"), headers=AUTH, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the gateway should serve again once the held requests are gone"
        time.sleep(0.5)
    serve.delete("tight")


def test_model_call_past_request_timeout_gets_503_not_a_hung_client(base_url, registry, demo_images):
    """A third app whose image model waits 3 s to fill a batch but whose gateway gives a model call
    0.5 s: a lone request is answered 503 (with Retry-After) after about 0.5 s, not after the batch
    window, and the app keeps answering its health checks."""
    args = app_args(registry, num_cpus=0)
    slow = {"request_timeout_s": 0.5, "batch_wait_timeout_s": 3.0, "max_batch_size": 32, "num_cpus": 0.25}
    serve.run(build_app(args | {"workloads": {"image": slow}}), name="slow", route_prefix="/slow")
    try:
        for _ in range(2):  # and again: the cancelled call left nothing stuck behind it
            started = time.monotonic()
            answer = requests.post(f"{base_url}/slow/image/predict", data=_digit(demo_images, "4"), headers=AUTH, timeout=30)
            waited = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "1"
            assert answer.json()["error"]["message"] == "no answer within 0.5 s; retry later"
            assert waited < 2.5, f"answered after {waited:.1f} s: the gateway waited for the batch window"
        assert requests.get(f"{base_url}/slow/healthz", timeout=30).status_code == 200
    finally:
        serve.delete("slow")


def _status_within(sock: socket.socket, seconds: float) -> int | None:
    """The HTTP status the server sent on this connection, or None if it is still working on it."""
    sock.settimeout(seconds)
    try:
        head = sock.recv(64)
    except TimeoutError:
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/") else -1


def _hold_request(url: str) -> socket.socket:
    """Send headers announcing a body, then only part of it: the request stays in flight."""
    host_port = url.split("/")[2]
    host, port = host_port.split(":")
    path = "/" + url.split("/", 3)[3]
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 100000\r\n\r\n".encode()
        + b"x" * 10
    )
    return sock


def test_metrics_are_exported_in_prometheus_format(base_url, metrics_port, demo_images):
    for _ in range(3):
        requests.post(f"{base_url}/image/predict", data=_digit(demo_images, "5"), headers=AUTH, timeout=60)
    wanted = ("ray_app_requests_total", "ray_app_request_latency_ms_bucket", "ray_app_batch_size_bucket", "ray_app_predictions_total")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    assert 'workload="image"' in text


def test_model_console_routes(base_url):
    """The page's own routes: each workload's registry record (cards, alias history) behind the
    API key, and a DICOM file rendered as a PNG (a PNG upload is the browser's to show: 422)."""
    assert requests.get(f"{base_url}/v1/models/image/history", timeout=30).status_code == 401
    for workload in ("image", "text", "ctr"):
        record = requests.get(f"{base_url}/v1/models/{workload}/history", headers=AUTH, timeout=30)
        assert record.status_code == 200, record.text
        body = record.json()
        assert body["versions"] and body["aliases"]["production"] in [v["version"] for v in body["versions"]]
        first = body["versions"][0]
        assert first["registered_at"] and len(first["data_fingerprint"]) == 64 and first["run_name"]
        assert "config" not in first  # the card, not the whole registry record
        assert body["history"][0]["alias"] == "production" and body["history"][0]["kind"] == "register"
    assert requests.get(f"{base_url}/v1/models/audio/history", headers=AUTH, timeout=30).status_code == 422
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    with open(ct, "rb") as f:
        preview = requests.post(f"{base_url}/v1/preview", data=f.read(), headers=AUTH, timeout=60)
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png", preview.text[:300]
    assert Image.open(io.BytesIO(preview.content)).size == (256, 256)
    png = requests.post(f"{base_url}/v1/preview", data=b"\x89PNG\r\n\x1a\n" + b"0" * 64, headers=AUTH, timeout=30)
    assert png.status_code == 422 and "not a DICOM file" in png.json()["error"]["message"]


def test_try_it_page_in_a_real_browser(base_url, demo_images, tmp_path):
    """Headless Chromium drives the model console: the API key, a card per served model that
    matches the registry, the alias history, a preview of the uploaded PNG and of a DICOM file
    (rendered by the server), probability bars for each workload. A screenshot is kept under
    test-artifacts/ (git ignores it)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: `make setup` installs Debian's chromium")
    digit = tmp_path / "digit.png"
    digit.write_bytes(_digit(demo_images, "6"))
    served = requests.get(f"{base_url}/v1/models", headers=AUTH, timeout=120).json()["models"]
    records = {
        m["workload"]: requests.get(f"{base_url}/v1/models/{m['workload']}/history", headers=AUTH, timeout=30).json() for m in served
    }
    screenshot = ARTIFACTS / "try_it_page.png"
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{base_url}/")
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#ctr-fields input", timeout=120_000)  # the click form is built from the model's schema
            page.wait_for_selector("#card-ctr", timeout=60_000)
            assert "image v" in page.text_content("#models-status")
            cards = {m["workload"]: page.text_content(f"#card-{m['workload']}") for m in served}
            history_rows = [row.text_content() for row in page.query_selector_all("#alias-history tbody tr")]

            # A DICOM file: the browser cannot show it, the server renders it (256×256 PNG).
            page.set_input_files("#image-file", pydicom.data.get_testdata_file("CT_small.dcm"))
            page.wait_for_function("document.querySelector('#image-preview').naturalWidth === 256", timeout=60_000)
            dicom_note = page.text_content("#image-preview-note")
            page.locator("#image").screenshot(path=str(ARTIFACTS / "dicom_preview.png"))

            page.set_input_files("#image-file", str(digit))
            page.wait_for_function("document.querySelector('#image-preview').naturalWidth === 28", timeout=30_000)
            page.click("#image-form button")
            page.wait_for_selector("#image-bars .bar", timeout=60_000)
            image_bars = page.eval_on_selector_all("#image-bars .bar", "rows => rows.map(r => [r.dataset.label, Number(r.dataset.value)])")
            image_answer = json.loads(page.text_content("#image-result"))
            # Drawn, not only present: each fill's width is its probability's share of the track.
            drawn = page.eval_on_selector_all(
                "#image-bars .bar",
                "rows => rows.map(r => r.querySelector('.fill').getBoundingClientRect().width / r.querySelector('.track').getBoundingClientRect().width)",
            )

            page.fill("#text-input", "a delight from start to finish")
            page.click("#text-form button")
            page.wait_for_selector("#text-bars .bar", timeout=60_000)
            text_bars = page.eval_on_selector_all("#text-bars .bar", "rows => rows.map(r => [r.dataset.label, Number(r.dataset.value)])")

            for field in page.query_selector_all("#ctr-fields input"):
                field.fill("3")
            page.click("#ctr-form button")
            page.wait_for_selector("#ctr-bars .bar", timeout=60_000)
            ctr_bars = page.eval_on_selector_all("#ctr-bars .bar", "rows => rows.map(r => Number(r.dataset.value))")
            ctr_answer = json.loads(page.text_content("#ctr-result"))
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots of the model console: {screenshot}, {ARTIFACTS / 'dicom_preview.png'}")
    for model in served:
        record, card = records[model["workload"]], cards[model["workload"]]
        version = next(v for v in record["versions"] if v["version"] == model["version"])
        assert f"v{model['version']}" in card and version["run_name"] in card, card
        assert version["data_fingerprint"][:16] in card and version["data"] in card, card
        assert version["registered_at"][:10] in card, card  # the date it was registered
        if record["aliases"].get("production") == model["version"]:
            assert "production" in card, card
    moves = sum(len(r["history"]) for r in records.values())
    assert len(history_rows) == moves >= 3, history_rows
    assert any("production" in row and "register" in row for row in history_rows), history_rows
    assert [label for label, _ in image_bars] == [p["label"] for p in image_answer["predictions"]]
    assert [value for _, value in image_bars] == sorted((value for _, value in image_bars), reverse=True)
    assert 0 < sum(value for _, value in image_bars) <= 1.0001
    assert drawn == pytest.approx([value for _, value in image_bars], abs=0.01) and drawn[0] > 0.05
    assert len(text_bars) == 1 and text_bars[0][0].split()[-1] in ("fresh", "rotten") and 0.5 <= text_bars[0][1] <= 1
    assert ctr_bars == ctr_answer["click_probability"] and all(0 <= v <= 1 for v in ctr_bars)
    assert "DICOM" in dicom_note
    assert screenshot.stat().st_size > 10_000


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(base_url, mode):
    """Requests generated from the OpenAPI schema, valid and invalid, for every route: the answer is
    never a server error, and every error is the JSON ``{"error": {"status", "message"}}``."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    answered: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        answered[operation.label] = set()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def never_a_server_error(case) -> None:
            response = case.call(base_url=base_url, headers=AUTH, timeout=120)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                assert response.json()["error"]["status"] == response.status_code
            answered[case.operation.label].add(response.status_code)

        try:
            never_a_server_error()
        except Unsatisfiable:  # a route without inputs has no invalid form
            assert mode is GenerationMode.NEGATIVE and not operation.definition.raw.get("parameters"), operation.label
    assert {"POST /{workload}/predict", "GET /v1/models", "GET /healthz"} <= set(answered), answered
    assert answered["POST /{workload}/predict"] and answered["GET /{workload}/model"], answered


def test_the_gateway_calls_models_with_the_transport_of_the_process_it_runs_in(base_url):
    """A handle bound in the deploying driver keeps the driver's transport choice (Serve reads
    RAY_SERVE_USE_GRPC_BY_DEFAULT when it is imported); the gateway remakes its handles where it
    runs, so the cluster's setting decides. A handle made with the other transport comes back
    with this process's default."""
    from ray_app.serving.gateway import handle_made_here

    fresh = serve.get_deployment_handle("ctr-model", app_name="ray_app")
    default = fresh.handle_options._by_reference
    from_elsewhere = fresh.options(_by_reference=not default)
    assert from_elsewhere.handle_options._by_reference is (not default)
    here = handle_made_here(from_elsewhere)
    assert (here.deployment_name, here.app_name) == ("ctr-model", "ray_app")
    assert here.handle_options._by_reference is default
