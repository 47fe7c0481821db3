"""Hostile inputs: decompression bombs, formats outside the allow-list, huge and deeply nested JSON,
huge integers, unicode edge cases, slow and chunked bodies, wrong content types, 10k-item lists.

The first half calls the decoders directly (no Ray). The second half sends the whole corpus over
HTTP to the serving app (``cluster/serve/app.yaml``'s gateway + one model deployment per workload)
hosting small untrained models: every answer must be a JSON 4xx within 2 s, no replica may die,
and a model replica's memory may grow by at most ``MEMORY_GROWTH_BOUND`` across the corpus.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pandas as pd
import psutil
import pytest
import requests
import yaml
from own_processes import own_processes
from PIL import Image
from small_models import CTR_MANIFEST, SMALL_MODELS, small_registry

from ray_app.workloads.base import BadInput
from ray_app.workloads.ctr import CTRPreparer, CTRWorkload
from ray_app.workloads.image import ImageOptions, ImageWorkload, decode_image
from ray_app.workloads.text import TextOptions, TextWorkload


# ---- the corpus's building blocks ------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black grayscale PNG of width×height pixels that is a few hundred KB on the wire:
    compressed row by row, so building a 100 Mpx bomb needs no 100 MB buffer here."""
    compressor, parts, row = zlib.compressobj(9), [], b"\x00" * (width + 1)  # filter byte + pixels
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size[::-1], dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def nested_json(depth: int) -> bytes:
    return b'{"texts": ' + b"[" * depth + b"]" * depth + b"}"


# ---- images ----------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_its_header_without_decoding():
    """100 Mpx (Pillow only warns below 178 Mpx and decodes ~100 MB): refused before any pixel is
    decoded, so the decoder's memory stays far below the image's size."""
    bomb = png_bomb(10_000, 10_000)
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(BadInput, match="image too large"):
            decode_image(bomb, 28, 1, max_bytes=10_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB allocated while refusing a bomb"


def test_pixel_cap_is_an_option():
    with pytest.raises(BadInput, match="1600 pixels > limit 1000"):
        decode_image(encoded("PNG", (40, 40)), 28, 1, max_bytes=1_000_000, max_pixels=1000)
    assert decode_image(encoded("PNG", (30, 30)), 28, 1, max_bytes=1_000_000, max_pixels=1000).shape == (1, 28, 28)
    with pytest.raises(ValueError):  # never above Pillow's own warning threshold
        ImageOptions(max_pixels=Image.MAX_IMAGE_PIXELS + 1)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PPM", "ICO", "WEBP"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    with pytest.raises(BadInput, match="accepted format"):
        decode_image(encoded(fmt), 28, 1, max_bytes=1_000_000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_allowed_formats_decode(fmt):
    assert decode_image(encoded(fmt), 28, 1, max_bytes=1_000_000).shape == (1, 28, 28)


def test_batch_paths_check_a_files_size_before_reading_it(tmp_path):
    """A 256 MB sparse file among the inputs costs a stat, not 256 MB of memory."""
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    small = tmp_path / "small.png"
    small.write_bytes(encoded("PNG"))
    workload, options = ImageWorkload(), ImageOptions(max_file_bytes=1_000_000)
    tracemalloc.start()
    try:
        items, ids, reasons = workload.load_predict_batch({"path": np.array([str(huge), str(small)])}, options, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reasons[0] == f"file too large: {256 * 1024 * 1024} bytes > limit 1000000" and items[0] is None
    assert reasons[1] is None and items[1].shape == (1, 28, 28)
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB allocated: the file was read before its size was checked"


# ---- text ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_workload() -> TextWorkload:
    workload = TextWorkload()
    workload.tokenizer(TextOptions())  # the packaged MiniLM tokenizer, loaded once
    return workload


def test_too_many_texts_are_refused_before_tokenizing(text_workload):
    """200k tiny texts (1 MB): a 422 for the count, without tokenizing 200k texts first."""
    body = b'{"texts": [' + b",".join([b'"a"'] * 200_000) + b"]}"
    started = time.perf_counter()
    with pytest.raises(BadInput, match="200000 items in one request, at most 64"):
        text_workload.decode_request(body, TextOptions(), {}, max_items=64)
    assert time.perf_counter() - started < 1.0  # tokenizing them all took 4.8 s


def test_a_huge_text_is_clipped_before_tokenizing(text_workload):
    """One 5 MB text: tokenized as the model would see it (max_length tokens, marked truncated)
    without tokenizing 5 MB first."""
    body = ('{"texts": ["' + "lovely film " * 420_000 + '", "short"]}').encode()
    started = time.perf_counter()
    decoded = text_workload.decode_request(body, TextOptions(max_length=64), {}, max_items=64)
    assert time.perf_counter() - started < 1.0  # tokenizing it took 5.7 s
    (long_ids, long_extras), (short_ids, short_extras) = decoded
    assert len(long_ids) == 64 and long_extras == {"truncated": True}
    assert short_extras == {"truncated": False} and len(short_ids) < 64


def test_first_text_requests_decode_concurrently():
    """A model replica decodes requests in a thread pool: the first requests of a fresh replica
    load the tokenizer from several threads at once (a raced load or first call fails)."""
    import concurrent.futures
    import functools

    for _ in range(3):
        workload = TextWorkload()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            bodies = [b'{"texts": ["a lovely film %d"]}' % i for i in range(32)]
            decoded = list(pool.map(functools.partial(workload.decode_request, options=TextOptions(), manifest={}, max_items=8), bodies))
        assert all(len(d) == 1 for d in decoded)


@pytest.mark.parametrize(
    "body",
    [
        nested_json(5000),
        b'{"texts": ["\\ud800"]}',  # a lone surrogate
        b'{"texts": [123456789012345678901234567890123456789012345678901234567890]}',
        b'{"texts": ["ok"], "extra": 1}',
        '{"texts": ["\u202e\u0000\ufeff"]}'.encode(),
        b"\xff\xfe not utf-8",
    ],
)
def test_malformed_text_bodies_are_bad_input(text_workload, body):
    try:
        decoded = text_workload.decode_request(body, TextOptions(), {}, max_items=64)
    except BadInput:
        return
    assert len(decoded) == 1  # unicode that is valid JSON is fine: it is just a text


# ---- clicks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"events": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed JSON"),
        (b'{"age": ' + b"9" * 400 + b', "user": "u1"}', "age"),
        (b'{"age": -' + b"9" * 400 + b', "user": "u1"}', "age"),
        (b'{"age": 1e400, "user": "u1"}', "age"),
        (b'{"age": ' + b"9" * 5000 + b', "user": "u1"}', "malformed JSON"),
        (b'{"events": [' + b",".join([b'{"age": 1, "user": "u"}'] * 10_000) + b"]}", "10000 items in one request, at most 256"),
    ],
)
def test_click_bodies_that_used_to_500_are_bad_input(body, words):
    with pytest.raises(BadInput, match=words):
        CTRWorkload().decode_request(body, None, CTR_MANIFEST, max_items=256)


def test_a_400_digit_category_id_is_just_a_category():
    decoded = CTRWorkload().decode_request(b'{"age": 30, "user": ' + b"9" * 400 + b"}", None, CTR_MANIFEST, max_items=256)
    assert len(decoded) == 1


def test_events_without_a_usable_timestamp_are_rejected_not_put_in_test():
    """Splits are by time: an event whose time is missing or unparseable has no split; it used to
    land in "test" (NaN compares false with every cutoff)."""
    batch = pd.DataFrame(
        {
            "click": [0, 1, 0, 1],
            "age": [30, 40, 50, 60],
            "user": ["a", "b", "c", "d"],
            "timestamp": [50, 150, None, "yesterday"],
        }
    )
    options = {"numeric_columns": ["age"], "categorical_columns": ["user"], "item_column": None}
    out = CTRPreparer(options, CTR_MANIFEST)(batch).to_pandas()
    assert out["status"].tolist() == ["ok", "ok", "rejected", "rejected"]
    assert out["reject_reason"].tolist()[2:] == ["timestamp: missing or not a number"] * 2
    assert out["split"].tolist()[:2] == ["train", "val"]


# ---- the corpus over HTTP, against the serving app -------------------------------------------
API_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "cluster", "serve", "app.yaml")
ANSWER_WITHIN_S = 2.0
BODY_TIMEOUT_S = 1.0  # the app's body deadline here: a slow body is answered 408 within the 2 s
# A model replica's resident memory may grow by at most this across the whole corpus (after a
# warm-up). Decoding one 100 Mpx bomb would take 100 MB (grayscale) to 400 MB (RGBA) at once.
MEMORY_GROWTH_BOUND = 64 * 1024 * 1024


def app_args(models: str) -> dict:
    """The shipped config's args, sized for 2 CPUs: every model on one replica, always on."""
    with open(APP_CONFIG) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    args["models"] = models
    args["gateway"].update(api_key_sha256=[hashlib.sha256(API_KEY.encode()).hexdigest()], body_timeout_s=BODY_TIMEOUT_S, num_cpus=0)
    for workload in args["workloads"].values():
        workload.update(num_cpus=0.25, min_replicas=1, max_replicas=1, alias_poll_s=0.5)
    return args


def replica_processes(app: str) -> dict[str, psutil.Process]:
    found = {}
    for name in SMALL_MODELS:
        for p in own_processes(f"ServeReplica:{app}:{name}-model"):
            found[name] = p
    return found


@pytest.fixture(scope="module")
def hostile_app(session_serve, tmp_path_factory) -> str:
    from ray import serve

    from ray_app.serving.app import build_app

    # Each workload's real architecture, untrained: the serving path is under test, not the models.
    models = small_registry(str(tmp_path_factory.mktemp("hostile")), run_name="hostile")
    url = session_serve.start()  # the session's Serve: apps are deleted, Serve is not shut down
    serve.run(build_app(app_args(models)), name="hostile", route_prefix="/")
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the app never got ready"
        time.sleep(0.5)
    yield {"url": url, "models": models}
    for app in serve.status().applications:  # this module's apps, also those a failed test left
        if app in ("hostile", "flaky", "nokey"):
            serve.delete(app)


def _raw_request(url: str, head: str, body: bytes, pause_s: float = 0.0) -> tuple[int, bytes]:
    """Send a request by hand (for bodies ``requests`` will not send): the head, part of the body,
    then (after ``pause_s``) nothing more; returns the status and the answer's body."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        if pause_s:
            time.sleep(pause_s)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), payload


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _chunked(total: int, piece: int = 1 << 20):
    """A body without Content-Length (``Transfer-Encoding: chunked``)."""
    for _ in range(total // piece):
        yield b"\x00" * piece


def corpus() -> list[tuple[str, str, dict, object, set[int]]]:
    """(case, route, headers, body, accepted statuses). Bodies are built once per test run."""
    deep = b"[" * 5000 + b"]" * 5000
    huge_int = b"9" * 400
    unicode_cases = ["\ud800", "\u202e\u0000\ufeff", "\U0010ffff" * 100, "e\u0301" * 1000]
    json_type = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, dict, object, set[int]]] = [
        ("100 Mpx PNG bomb", "image", {"Content-Type": "image/png"}, png_bomb(10_000, 10_000), {422}),
        ("170 Mpx PNG bomb", "image", {"Content-Type": "image/png"}, png_bomb(17_000, 10_000), {422}),
        ("200 Mpx PNG bomb", "image", {"Content-Type": "image/png"}, png_bomb(20_000, 10_000), {422}),
        *((f"{fmt} image", "image", {}, encoded(fmt), {422}) for fmt in ("GIF", "BMP", "TIFF", "WEBP", "ICO")),
        ("JSON to the image route", "image", json_type, b'{"texts": ["hello"]}', {422}),
        ("PNG to the text route", "text", {"Content-Type": "image/png"}, encoded("PNG"), {422}),
        ("PNG to the click route", "ctr", {"Content-Type": "image/png"}, encoded("PNG"), {422}),
        ("form without a file field", "text", {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--\r\n", {400}),
        ("form with a broken boundary", "image", {"Content-Type": "multipart/form-data; boundary=x"}, b"--y\r\njunk", {400}),
        ("200k tiny texts", "text", json_type, b'{"texts": [' + b",".join([b'"a"'] * 200_000) + b"]}", {422}),
        ("10k texts", "text", json_type, json.dumps({"texts": ["a film"] * 10_000}).encode(), {422}),
        ("10k events", "ctr", json_type, json.dumps({"events": [{"age": 3, "user": "u"}] * 10_000}).encode(), {422}),
        ("10k-item top-level list", "ctr", json_type, json.dumps([1] * 10_000).encode(), {422}),
        ("2 MB of JSON", "text", json_type, json.dumps({"texts": ["x" * 2_000_000]}).encode(), {413}),
        ("chunked 20 MB without Content-Length", "image", {}, _chunked(20 << 20), {413}),
        ("chunked 2 MB of JSON", "ctr", json_type, _chunked(2 << 20), {413}),
        ("400-digit age", "ctr", json_type, b'{"age": ' + huge_int + b', "user": "u"}', {422}),
        ("400-digit negative age", "ctr", json_type, b'{"age": -' + huge_int + b', "user": "u"}', {422}),
        ("5000-digit age", "ctr", json_type, b'{"age": ' + b"9" * 5000 + b', "user": "u"}', {422}),
        ("1e400 age", "ctr", json_type, b'{"age": 1e400, "user": "u"}', {422}),
        ("age as a string", "ctr", json_type, b'{"age": "NaN", "user": "u"}', {422}),
        ("400-digit text", "text", json_type, b'{"texts": [' + huge_int + b"]}", {422}),
        ("empty JSON object", "ctr", json_type, b"{}", {422}),
        ("JSON null", "text", json_type, b"null", {422}),
        ("invalid UTF-8", "text", json_type, b'{"texts": ["\xff\xfe"]}', {422}),
        ("UTF-16 JSON", "text", json_type, '{"texts": ["a"]}'.encode("utf-16"), {422}),
        ("empty body", "ctr", json_type, b"", {400}),
        *((f"{depth}-deep JSON to {route}", route, json_type, deep, {422}) for route in SMALL_MODELS for depth in [5000]),
        *(
            (f"unicode edge case {i} ({route})", route, json_type, json.dumps(body).encode(), {422} if route == "ctr" else {200, 422})
            for i, text in enumerate(unicode_cases)
            for route, body in (("text", {"texts": [text]}), ("ctr", {"age": text, "user": text}))
        ),
        ("lone surrogate escape", "text", json_type, b'{"texts": ["\\ud800"]}', {200, 422}),
    ]
    return cases


def _post(url: str, route: str, headers: dict, body) -> tuple[int, float, requests.Response]:
    started = time.monotonic()
    answer = requests.post(f"{url}/{route}/predict", data=body, headers={**AUTH, **headers}, timeout=30)
    return answer.status_code, time.monotonic() - started, answer


def test_the_corpus_gets_fast_json_4xx_and_replicas_survive(hostile_app):
    url = hostile_app["url"]
    warm = {"image": encoded("PNG"), "text": b'{"texts": ["a warm-up"]}', "ctr": b'{"age": 30, "user": "u1"}'}
    for _ in range(3):  # first forward passes, tokenizer and schema caches: not growth
        for route, body in warm.items():
            assert _post(url, route, {}, body)[0] == 200
    before = replica_processes("hostile")
    assert set(before) == set(SMALL_MODELS)
    rss_before = {name: p.memory_info().rss for name, p in before.items()}
    slow = []
    for case, route, headers, body, accepted in corpus():
        status, seconds, answer = _post(url, route, headers, body)
        assert status in accepted, f"{case}: {status} {answer.text[:300]}"
        if status >= 400:
            assert answer.json()["error"]["status"] == status, case
        if seconds > ANSWER_WITHIN_S:
            slow.append(f"{case}: {seconds:.2f} s")
    # A huge valid text is not refused: it is clipped and answered, also fast.
    status, seconds, answer = _post(url, "text", {}, json.dumps({"texts": ["lovely film " * 80_000]}).encode())
    assert status == 200 and answer.json()["results"][0]["truncated"] is True
    if seconds > ANSWER_WITHIN_S:
        slow.append(f"a 960 kB text: {seconds:.2f} s")
    assert not slow, slow
    after = replica_processes("hostile")
    assert {n: p.pid for n, p in after.items()} == {n: p.pid for n, p in before.items()}, "a model replica died"
    growth = {name: p.memory_info().rss - rss_before[name] for name, p in after.items()}
    assert max(growth.values()) <= MEMORY_GROWTH_BOUND, {n: f"{g / 2**20:.0f} MiB" for n, g in growth.items()}


def test_a_slow_body_gets_408_in_time_and_frees_its_slot(hostile_app):
    url = hostile_app["url"]
    head = f"POST /image/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 100000\r\n\r\n"
    started = time.monotonic()
    status, payload = _raw_request(url, head, b"\x89PNG" + b"\x00" * 100)
    waited = time.monotonic() - started
    assert status == 408 and json.loads(payload)["error"]["status"] == 408
    assert BODY_TIMEOUT_S - 0.2 < waited < ANSWER_WITHIN_S, waited
    chunked = f"POST /text/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _ = _raw_request(url, chunked, b'5\r\n{"tex\r\n')
    assert status == 408
    assert _post(url, "image", {}, encoded("PNG"))[0] == 200


def test_liveness_and_readiness(hostile_app):
    url = hostile_app["url"]
    assert requests.get(f"{url}/livez", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == {name: "loaded" for name in SMALL_MODELS}
    assert requests.get(f"{url}/healthz", timeout=10).json() == ready.json()


def test_a_damaged_registry_marks_the_model_stale_while_it_keeps_serving(hostile_app):
    """The alias record the replicas poll is damaged: they keep serving the model they have, and
    readiness says so (503, "stale", with the reason) until the registry is readable again."""
    from ray_app.registry import HISTORY_FOLDER

    url = hostile_app["url"]
    records = sorted(glob.glob(os.path.join(hostile_app["models"], "image", HISTORY_FOLDER, "*.json")))
    newest = records[-1]
    with open(newest) as f:
        intact = f.read()
    try:
        with open(newest, "w") as f:
            f.write("{not json")
        ready = _wait_for(lambda: requests.get(f"{url}/readyz", timeout=10), lambda r: r.status_code == 503)
        assert ready.json()["models"]["image"] == "stale" and ready.json()["models"]["text"] == "loaded"
        assert "could not be followed" in ready.json()["problems"]["image"]
        assert requests.get(f"{url}/livez", timeout=5).status_code == 200
        assert _post(url, "image", {}, encoded("PNG"))[0] == 200  # still serving version 1
    finally:
        with open(newest, "w") as f:
            f.write(intact)
    _wait_for(lambda: requests.get(f"{url}/readyz", timeout=10), lambda r: r.status_code == 200)


def _wait_for(probe, done, limit_s: float = 30):
    deadline = time.monotonic() + limit_s
    while True:
        answer = probe()
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"still {answer!r} after {limit_s} s"
        time.sleep(0.2)


# ---- faults: poison pills, replica deaths, busy models --------------------------------------
def _flaky_model():
    """A stand-in model deployment (no torch) whose replicas die on the body b"poison" and sleep on
    b"sleep<seconds>": the gateway's retry and health logic meets real replica deaths."""
    from ray import serve

    from ray_app.config import DeploymentScaling

    # Checked for crashes as often as the model deployments are (their replacements start as soon).
    health_check_period_s = DeploymentScaling().health_check_period_s

    @serve.deployment(
        name="image-model",
        num_replicas=3,
        max_ongoing_requests=4,
        ray_actor_options={"num_cpus": 0},
        health_check_period_s=health_check_period_s,
    )
    class Flaky:
        def ready(self) -> dict:
            return {"loaded": True, "stale": False, "problem": None}

        async def predict(self, payload: bytes) -> dict:
            import asyncio

            if payload == b"poison":
                await asyncio.sleep(0.3)  # some work first, as a decode that runs out of memory does
                os._exit(1)  # what an out-of-memory kill looks like from outside: the process is gone
            if payload.startswith(b"sleep"):
                await asyncio.sleep(float(payload[5:]))
            return {"status": 200, "body": {"pid": os.getpid()}}

    return Flaky


def _flaky_pids() -> set[int]:
    return {p.pid for p in own_processes("ServeReplica:flaky:image-model")}


@pytest.fixture(scope="module")
def flaky_url(hostile_app) -> str:
    from ray import serve

    from ray_app.serving.gateway import Gateway

    settings = {
        "workloads": {"image": {"min_replicas": 1, "request_timeout_s": 20}},
        "gateway": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]},
    }
    serve.run(
        Gateway.options(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}).bind(settings, {"image": _flaky_model().bind()}),
        name="flaky",
        route_prefix="/flaky",
    )
    url = f"{hostile_app['url']}/flaky"
    _wait_for(lambda: len(_flaky_pids()), lambda n: n == 3)
    return url


def _three_flaky_replicas_serving(url: str) -> None:
    _wait_for(lambda: (len(_flaky_pids()), requests.post(f"{url}/image/predict", data=b"ok", headers=AUTH, timeout=30).status_code),
              lambda state: state == (3, 200), limit_s=60)  # fmt: skip


def test_a_poison_request_kills_at_most_two_replicas_and_is_then_refused(flaky_url):
    _three_flaky_replicas_serving(flaky_url)
    before = _flaky_pids()
    answer = requests.post(f"{flaky_url}/image/predict", data=b"poison", headers=AUTH, timeout=60)
    assert answer.status_code == 422, answer.text
    assert "in flight when 2 model replicas died" in answer.json()["error"]["message"]
    survivors = before & _flaky_pids()
    assert len(survivors) == 1, f"{len(before) - len(survivors)} of {len(before)} replicas died for one request"
    again = requests.post(f"{flaky_url}/image/predict", data=b"poison", headers=AUTH, timeout=60)
    assert again.status_code == 422 and survivors <= _flaky_pids(), "a known poison pill was run again"


def test_a_replica_killed_under_load_fails_no_request(flaky_url):
    """The retry cap must not cost the old guarantee: a replica that dies for other reasons (here
    SIGKILL) while requests run on it costs retries, not failures."""
    _three_flaky_replicas_serving(flaky_url)
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            statuses.append(session.post(f"{flaky_url}/image/predict", data=b"sleep0.05", headers=AUTH, timeout=60).status_code)

    workers = [threading.Thread(target=client) for _ in range(6)]
    for w in workers:
        w.start()
    time.sleep(1)
    os.kill(sorted(_flaky_pids())[0], signal.SIGKILL)
    time.sleep(2)
    stop.set()
    for w in workers:
        w.join()
    assert len(statuses) > 50 and set(statuses) == {200}, collections.Counter(statuses)


def test_liveness_never_waits_behind_predictions(flaky_url):
    """Every model slot busy (3 replicas × 4) and more queued: /livez answers at once, and
    /readyz says busy-but-loaded (200) instead of dropping the app from the load balancer."""
    _three_flaky_replicas_serving(flaky_url)
    assert requests.get(f"{flaky_url}/readyz", timeout=10).json()["models"] == {"image": "loaded"}
    busy = [
        threading.Thread(target=requests.post, args=(f"{flaky_url}/image/predict",), kwargs={"data": b"sleep4", "headers": AUTH})
        for _ in range(16)
    ]
    for t in busy:
        t.start()
    time.sleep(1)
    started = time.monotonic()
    live = requests.get(f"{flaky_url}/livez", timeout=5)
    live_s = time.monotonic() - started
    ready = requests.get(f"{flaky_url}/readyz", timeout=10)
    for t in busy:
        t.join()
    assert live.status_code == 200 and live_s < 0.5, live_s
    assert ready.status_code == 200 and ready.json()["models"] == {"image": "loaded (busy)"}, ready.text


def test_inference_routes_are_closed_without_a_key(hostile_app):
    from ray import serve

    from ray_app.serving.gateway import Gateway

    settings = {"workloads": {"image": {"min_replicas": 1}}}  # no key, and no allow_unauthenticated
    model = _flaky_model().options(num_replicas=1)
    serve.run(
        Gateway.options(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}).bind(settings, {"image": model.bind()}),
        name="nokey",
        route_prefix="/nokey",
    )
    try:
        answer = requests.post(f"{hostile_app['url']}/nokey/image/predict", data=b"ok", timeout=30)
        assert answer.status_code == 401 and "no API key is configured" in answer.json()["error"]["message"]
        assert requests.get(f"{hostile_app['url']}/nokey/livez", timeout=10).status_code == 200
    finally:
        serve.delete("nokey")


# ---- a pin during an alias rollout --------------------------------------------------------------
class FileAliasLoader:
    """Aliases read from files in ``folder`` (``folder/production`` holds a version number); a
    version with a ``slow-<version>`` file takes 2 s to load. The models are the image workload's
    real architecture with seeded random weights, tagged with their version."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def resolve(self, workload: str, ref: str) -> str:
        if ref.isdigit():
            return ref
        with open(os.path.join(self.folder, ref)) as f:
            return f.read().strip()

    def load(self, workload: str, resolved: str, use_gpu: bool):
        from ray_app.serving.loaders import untrained_model

        if os.path.exists(os.path.join(self.folder, f"slow-{resolved}")):
            time.sleep(2)
        options, manifest = SMALL_MODELS["image"]
        return untrained_model("image", manifest, options, version=int(resolved))


def test_a_pin_wins_over_an_alias_load_in_flight(tmp_path):
    """The model deployment's own class, driven the way Serve drives it: an emergency pin to
    version 1 (``reconfigure``) arrives while an alias poll is loading version 2 (a slow load).
    The pin is what is served when both are done, and later polls leave it alone; it used to be
    undone by whichever load finished last."""
    import asyncio

    from ray_app.config import ServeConfig
    from ray_app.serving.model_server import ModelServer

    (tmp_path / "production").write_text("1")
    settings = ServeConfig(alias_poll_s=0)  # polls driven by the test, not a timer

    async def scenario() -> list[tuple[int, str]]:
        server = ModelServer.func_or_class("image", settings, FileAliasLoader(str(tmp_path)))
        await server.reconfigure({"model": "production"})
        seen = [(server.ready()["version"], server.model_ref)]
        (tmp_path / "slow-2").write_text("")
        (tmp_path / "production").write_text("2")  # the alias moves
        poll = asyncio.create_task(server.poll_alias())  # starts loading version 2 (2 s)
        await asyncio.sleep(0.5)
        await server.reconfigure({"model": "1"})  # the pin, while that load is in flight
        await poll
        seen.append((server.ready()["version"], server.model_ref))
        await server.poll_alias()  # a later poll: the pin is not an alias, nothing moves
        seen.append((server.ready()["version"], server.model_ref))
        return seen

    assert asyncio.run(scenario()) == [(1, "production"), (1, "1"), (1, "1")]
