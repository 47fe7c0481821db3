"""Hostile inputs: decompression bombs, formats outside the allow-list, huge and deeply nested JSON,
huge integers, unicode edge cases, slow and chunked bodies, wrong content types, 10k-item lists.

The first half calls the decoders directly (no Ray). The second half sends the whole corpus over
HTTP to the serving app (``cluster/serve/app.yaml``'s gateway + one model deployment per workload)
hosting small untrained models: every answer must be a JSON 4xx within 2 s, no replica may die,
and a model replica's memory may grow by at most ``MEMORY_GROWTH_BOUND`` across the corpus.
"""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

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


CTR_MANIFEST = {
    "classes": ["no_click", "click"],
    "transform": {"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16, "means": [0.0], "stds": [1.0]},
    "time_cutoffs": [100.0, 200.0],
    "split_fractions": [0.1, 0.1],
}


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


@pytest.mark.parametrize(
    "body",
    [
        nested_json(5000),
        b'{"texts": ["\\ud800"]}',  # a lone surrogate
        b'{"texts": [123456789012345678901234567890123456789012345678901234567890]}',
        b'{"texts": ["ok"], "extra": 1}',
        "{\"texts\": [\"\u202e\u0000\ufeff\"]}".encode(),
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

