"""The HTTP endpoint answers real images and rejects bad bodies with JSON 4xx, then keeps serving."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image
from ray import serve

from ray_app.demo_data import first_digit_file


@pytest.fixture(scope="module")
def endpoint(trained_workspace, start_endpoint):
    yield start_endpoint("image", trained_workspace["workspace"], max_body_bytes=200_000, min_replicas=1, max_replicas=1)
    serve.shutdown()


def _digit(demo_images: str, digit: str) -> bytes:
    with open(first_digit_file(demo_images, digit), "rb") as f:
        return f.read()


def test_real_image_gets_top_k_labels(endpoint, demo_images):
    answer = requests.post(endpoint, data=_digit(demo_images, "1"), timeout=30)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["probability"] >= predictions[1]["probability"] >= predictions[2]["probability"]
    assert {p["label"] for p in predictions} <= {str(i) for i in range(10)}


def test_multipart_upload_and_raw_body_agree(endpoint, demo_images):
    image = _digit(demo_images, "7")
    raw = requests.post(endpoint, data=image, timeout=30).json()
    form = requests.post(endpoint, files={"file": ("seven.png", image, "image/png")}, timeout=30).json()
    assert raw["predictions"] == form["predictions"]


def test_jpeg_and_rgb_inputs_are_converted(endpoint, demo_images):
    rgb = Image.open(io.BytesIO(_digit(demo_images, "3"))).convert("RGB").resize((64, 64))
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    assert requests.post(endpoint, data=buffer.getvalue(), timeout=30).status_code == 200


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
    answer = requests.post(endpoint, data=body, timeout=30)
    assert answer.status_code == status
    assert words in answer.json()["error"]["message"]
    assert requests.post(endpoint, data=_digit(demo_images, "0"), timeout=30).status_code == 200


def test_multipart_without_file_field_is_a_400(endpoint):
    answer = requests.post(endpoint, files={"picture": ("x.png", b"abc")}, timeout=30)
    assert answer.status_code == 400 and "'file'" in answer.json()["error"]["message"]


def test_health_and_model_info(endpoint):
    base = endpoint.rsplit("/", 1)[0]
    assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok", "models": {"image": "loaded"}}
    info = requests.get(f"{base}/model", timeout=10).json()
    assert info["version"] == 1 and info["classes"] == [str(i) for i in range(10)]
