"""The HTTP endpoint answers real images and rejects bad bodies with JSON 4xx, then keeps serving.

A contract test: the model deployment gets an untrained in-memory model through its loader (the
real image architecture and decoding, seeded random weights), so no training run is needed."""

from __future__ import annotations

import hashlib
import io
import secrets

import pytest
import requests
from PIL import Image
from ray import serve

from ray_app.demos.data import first_digit_file
from ray_app.serving.app import compose_app
from ray_app.serving.loaders import InMemoryLoader, untrained_model

API_KEY = secrets.token_urlsafe(16)  # made per run; only its digest goes into the app
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DIGITS = {"classes": [str(i) for i in range(10)], "shape": [1, 28, 28]}  # the image workload's manifest


@pytest.fixture(scope="module")
def endpoint(session_serve):
    url = session_serve.start()
    image = {"max_body_bytes": 200_000, "min_replicas": 1, "max_replicas": 1}
    args = {"workloads": {"image": image}, "gateway": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]}}
    loader = InMemoryLoader({"production": untrained_model("image", DIGITS, version=1)})
    serve.run(compose_app(args, loaders={"image": loader}), name="image", route_prefix="/image")
    yield f"{url}/image/predict"
    serve.delete("image")


def _digit(demo_images: str, digit: str) -> bytes:
    with open(first_digit_file(demo_images, digit), "rb") as f:
        return f.read()


def test_real_image_gets_top_k_labels(endpoint, demo_images):
    answer = requests.post(endpoint, data=_digit(demo_images, "1"), headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["probability"] >= predictions[1]["probability"] >= predictions[2]["probability"]
    assert {p["label"] for p in predictions} <= {str(i) for i in range(10)}


def test_multipart_upload_and_raw_body_agree(endpoint, demo_images):
    image = _digit(demo_images, "7")
    raw = requests.post(endpoint, data=image, headers=AUTH, timeout=30).json()
    form = requests.post(endpoint, files={"file": ("seven.png", image, "image/png")}, headers=AUTH, timeout=30).json()
    assert raw["predictions"] == form["predictions"]


def test_jpeg_and_rgb_inputs_are_converted(endpoint, demo_images):
    rgb = Image.open(io.BytesIO(_digit(demo_images, "3"))).convert("RGB").resize((64, 64))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    assert requests.post(endpoint, data=buffer.getvalue(), headers=AUTH, timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 400, "empty body"),
        (b"definitely not an image", 422, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 422, "image"),
        (b"\xff" * 300_000, 413, "exceeds the limit"),
    ],
)
def test_bad_bodies_get_json_4xx_and_the_replica_keeps_serving(endpoint, demo_images, body, status, words):
    answer = requests.post(endpoint, data=body, headers=AUTH, timeout=30)
    assert answer.status_code == status
    assert words in answer.json()["error"]["message"]
    assert requests.post(endpoint, data=_digit(demo_images, "0"), headers=AUTH, timeout=30).status_code == 200


def test_multipart_without_file_field_is_a_400(endpoint):
    answer = requests.post(endpoint, files={"picture": ("x.png", b"abc")}, headers=AUTH, timeout=30)
    assert answer.status_code == 400 and "'file'" in answer.json()["error"]["message"]


def test_health_and_model_info(endpoint):
    base = endpoint.rsplit("/", 1)[0]
    assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok", "models": {"image": "loaded"}}
    info = requests.get(f"{base}/model", headers=AUTH, timeout=10).json()
    assert info["version"] == 1 and info["classes"] == [str(i) for i in range(10)]
