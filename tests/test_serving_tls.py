"""HTTPS straight from Serve's proxy (``http_options.ssl_keyfile``/``ssl_certfile``), with a
self-signed certificate made by the test. The image model is an untrained in-memory one: TLS is
under test here, not what the model learned."""

import subprocess

import pytest
import requests
from ray import serve

from ray_app.config import load_config
from ray_app.demos.data import first_digit_file
from ray_app.runtime import unused_loopback_port
from ray_app.serving.app import compose_app, settings_from_config
from ray_app.serving.loaders import InMemoryLoader, untrained_model

DIGITS = {"classes": [str(i) for i in range(10)], "shape": [1, 28, 28]}  # the image workload's manifest


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key, "-out", cert,
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def https_endpoint(session_serve, certificate):
    key, cert = certificate
    serve.shutdown()  # HTTP options are fixed when Serve starts: the next module starts plain HTTP again
    port = unused_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "ssl_keyfile": key, "ssl_certfile": cert})
    config = load_config("image", overrides={"serve.num_cpus": 0.5})
    loader = InMemoryLoader({"production": untrained_model("image", DIGITS, version=1)})
    serve.run(compose_app(settings_from_config(config), loaders={"image": loader}), name="image", route_prefix="/image")
    yield f"https://127.0.0.1:{port}/image"
    serve.shutdown()


def test_https_answers_with_the_certificate_and_plain_http_does_not(https_endpoint, certificate, demo_images):
    with open(first_digit_file(demo_images, "3"), "rb") as f:
        image = f.read()
    answer = requests.post(f"{https_endpoint}/predict", data=image, verify=certificate[1], timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"]
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https_endpoint}/healthz", timeout=10)  # not trusted without the certificate
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(https_endpoint.replace("https://", "http://") + "/healthz", timeout=10)
