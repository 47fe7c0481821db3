"""Outputs never destroy inputs (issue 11, item 1): an output that is, contains or lies inside an
input is refused before anything is touched; outputs are published atomically, so a failed, killed
or out-of-space run leaves the previous output complete and readable. Faults are real: SIGKILL of
a writing process, ENOSPC from a wrapping pyarrow filesystem, concurrent writers, and an
S3-compatible server (moto) for the object-store path. Only the last test starts Ray."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fault_fs import faulty_filesystem

from ray_app import storage
from ray_app.prepared import count_rows, load_manifest, ok_uri, rejected_uri


def write_version(staging: storage.Staging, tag: str, rows: int = 3) -> None:
    """A small prepared-style output: Parquet under status=ok/ and status=rejected/ + manifest."""
    fs = staging.filesystem
    for status, n in (("ok", rows), ("rejected", 1)):
        fs.create_dir(f"{staging.path}/status={status}", recursive=True)
        pq.write_table(pa.table({"tag": [tag] * n}), f"{staging.path}/status={status}/part-0.parquet", filesystem=fs)
    with fs.open_output_stream(f"{staging.path}/manifest.json") as stream:
        stream.write(json.dumps({"tag": tag}).encode())


def read_tag(output: str) -> tuple[str, int]:
    """What a reader sees through the public layout: the manifest's tag and the good rows' tags."""
    tags = set(pq.read_table(ok_uri(output)).column("tag").to_pylist())
    assert len(tags) == 1, f"a reader saw a mix of versions: {tags}"
    return load_manifest(output)["tag"], count_rows(ok_uri(output))


# ---- refusal -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "inputs", "relation"),
    [
        ("/data", ["/data/scans"], "contains"),
        ("/data/scans/", ["/data/scans"], "is the same location as"),
        ("file:///data/scans", ["/data/scans/"], "is the same location as"),
        ("/data/scans/out", ["/data/scans"], "lies inside"),
        ("s3://bucket/ws", ["s3://bucket/ws/uploads/a.png"], "contains"),
        ("s3://bucket/ws/", ["s3://bucket/ws"], "is the same location as"),
        ("/ws/predictions", ["/up/a.png", "/ws"], "lies inside"),
    ],
)
def test_an_output_overlapping_an_input_is_refused_naming_both(output, inputs, relation):
    with pytest.raises(storage.OutputOverlapError) as refused:
        storage.refuse_overlap("predict", output, inputs)
    message = str(refused.value)
    assert relation in message and output in message and "nothing was written" in message
    assert any(i in message for i in inputs)


@pytest.mark.parametrize(
    ("output", "inputs"),
    [
        ("/data/scans-predictions", ["/data/scans"]),  # a shared name prefix is not containment
        ("/ws/image/predictions", ["/data/scans", None]),
        ("s3://bucket/ws", ["s3://other/ws", "gs://bucket/ws"]),  # another bucket or another store
    ],
)
def test_disjoint_outputs_are_accepted(output, inputs):
    storage.refuse_overlap("predict", output, inputs)


def test_a_symlink_cannot_hide_an_overlap(tmp_path):
    (tmp_path / "data" / "scans").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    with pytest.raises(storage.OutputOverlapError, match="contains"):
        storage.refuse_overlap("prepare", str(tmp_path / "alias"), [str(tmp_path / "data" / "scans")])


# ---- local publish -------------------------------------------------------------------------------
def test_publish_replaces_the_output_whole_and_keeps_one_previous_version(tmp_path):
    out = str(tmp_path / "prepared")
    for tag in ("v1", "v2", "v3"):
        with storage.publishing(out) as staging:
            assert not os.path.exists(os.path.join(out, "status=ok")) or read_tag(out)[0] != tag
            write_version(staging, tag)
        assert read_tag(out) == (tag, 3)
    # The public layout is unchanged for plain readers: <output>/status=ok/, <output>/manifest.json.
    assert pq.read_table(os.path.join(out, "status=ok")).column("tag").to_pylist() == ["v3"] * 3
    assert json.load(open(os.path.join(out, "manifest.json"))) == {"tag": "v3"}
    versions = sorted(e for e in os.listdir(tmp_path) if e.startswith(".prepared.v-"))
    assert len(versions) == 2, versions  # current + previous (for a reader that resolved it just before)
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e or ".link-" in e]


def test_an_output_in_the_old_layout_is_replaced_not_merged(tmp_path):
    out = tmp_path / "predictions"
    (out / "status=ok").mkdir(parents=True)
    pq.write_table(pa.table({"tag": ["old"] * 5}), out / "status=ok" / "part-9.parquet")
    with storage.publishing(str(out)) as staging:
        write_version(staging, "new")
    assert read_tag(str(out)) == ("new", 3)
    assert os.path.islink(out)


def test_an_error_midway_leaves_the_previous_output_and_no_staging(tmp_path):
    out = str(tmp_path / "prepared")
    with storage.publishing(out) as staging:
        write_version(staging, "good")
    with pytest.raises(RuntimeError, match="row accounting"), storage.publishing(out) as staging:
        write_version(staging, "half")
        raise RuntimeError("row accounting broken")
    assert read_tag(out) == ("good", 3)
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa, pyarrow.parquet as pq
    from ray_app import storage
    out, ready = sys.argv[1], sys.argv[2]
    with storage.publishing(out) as staging:
        import os
        os.makedirs(staging.path + "/status=ok")
        with pq.ParquetWriter(staging.path + "/status=ok/part-0.parquet", pa.schema([("tag", pa.string())])) as writer:
            writer.write_table(pa.table({"tag": ["killed"] * 1000}))
            open(ready, "w").close()
            time.sleep(60)  # killed here, mid-write: the Parquet footer is never written
    """
)


def test_sigkill_mid_write_leaves_the_previous_output_complete(tmp_path):
    out, ready = str(tmp_path / "predictions"), tmp_path / "ready"
    with storage.publishing(out) as staging:
        write_version(staging, "before")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, out, str(ready)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer never reached its write"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert read_tag(out) == ("before", 3)
    assert count_rows(rejected_uri(out)) == 1
    (leftover,) = [e for e in os.listdir(tmp_path) if ".tmp-" in e]  # the killed run's, never read
    # The next run publishes normally; the killed run's staging folder is garbage, removed once stale.
    with storage.publishing(out) as staging:
        write_version(staging, "after")
    assert read_tag(out) == ("after", 3)
    os.utime(tmp_path / leftover, (0, 0))
    with storage.publishing(out) as staging:
        write_version(staging, "again")
    assert not (tmp_path / leftover).exists()


def test_a_half_done_flip_is_finished_by_readers_and_the_next_run(tmp_path):
    """The one non-atomic moment: replacing an old-layout real folder (moved aside, then the link
    renamed into place). A kill between the two renames leaves exactly this state."""
    out = tmp_path / "prepared"
    new = tmp_path / ".prepared.v-20260101T000000-aaaa"
    staged = storage.Staging(str(new), pafs.LocalFileSystem(), str(new))
    new.mkdir()
    write_version(staged, "new")
    (tmp_path / ".prepared.link-20260101T000000-aaaa").symlink_to(new.name)
    old = tmp_path / ".prepared.v-20260101T000000-aaaa-replaced"
    old.mkdir()
    write_version(storage.Staging(str(old), pafs.LocalFileSystem(), str(old)), "old")
    assert not out.exists()
    assert read_tag(str(out)) == ("new", 3)  # readers resolve to the completed version
    with storage.publishing(str(out)) as staging:  # the next run completes the flip first
        write_version(staging, "next")
    assert read_tag(str(out)) == ("next", 3) and os.path.islink(out)


CONCURRENT_WRITER = textwrap.dedent(
    """
    import sys, pyarrow as pa, pyarrow.parquet as pq
    from ray_app import storage
    out, tag = sys.argv[1], sys.argv[2]
    for round in range(3):
        with storage.publishing(out) as staging:
            for part in range(3):
                import os
                os.makedirs(staging.path + "/status=ok", exist_ok=True)
                pq.write_table(pa.table({"tag": [tag] * 10}), f"{staging.path}/status=ok/part-{part}.parquet")
            with open(staging.path + "/manifest.json", "w") as f:
                f.write('{"tag": "%s"}' % tag)
    """
)


def test_concurrent_writers_never_leave_a_mixed_or_broken_output(tmp_path):
    out = str(tmp_path / "predictions")
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, out, f"w{i}"]) for i in range(3)]
    seen = set()
    while any(w.poll() is None for w in writers):
        if os.path.lexists(out):
            try:
                seen.add(read_tag(out))  # asserts one version's rows only
            except (OSError, pa.ArrowInvalid):
                pass  # a version two flips old was removed between resolving and reading: read again
        time.sleep(0.01)  # leave the writers the CPU
    assert all(w.returncode == 0 for w in writers)
    tag, rows = read_tag(out)
    assert tag in {"w0", "w1", "w2"} and rows == 30
    assert all(r == 30 for _, r in seen)


def test_a_publish_survives_another_writers_staging_folder_vanishing_meanwhile(tmp_path, monkeypatch):
    """A publish sweeps stale staging folders of other writers. One it has just listed can be gone
    before it is looked at (that writer flipped or cleaned up): seen once with three concurrent
    writers, where the publish then died with FileNotFoundError. The listing here names one
    that is already gone."""
    out = str(tmp_path / "predictions")
    listed = storage._local_siblings

    def listing_with_a_vanished_folder(final: str, kind: str) -> list[str]:
        parent, name = os.path.split(final)
        return [*listed(final, kind), os.path.join(parent, f".{name}.{kind}-20260101T000000-vanished")]

    monkeypatch.setattr(storage, "_local_siblings", listing_with_a_vanished_folder)
    for tag in ("first", "second"):
        with storage.publishing(out) as staging:
            os.makedirs(os.path.join(staging.path, "status=ok"))
            pq.write_table(pa.table({"tag": [tag] * 10}), os.path.join(staging.path, "status=ok", "part-0.parquet"))
            with open(os.path.join(staging.path, "manifest.json"), "w") as f:
                json.dump({"tag": tag}, f)
    assert read_tag(out) == ("second", 10)


# ---- a full disk ---------------------------------------------------------------------------------
def test_a_full_disk_midway_keeps_the_previous_output_and_says_so(tmp_path):
    out = str(tmp_path / "prepared")
    with storage.publishing(out) as staging:
        write_version(staging, "good", rows=3)
    full = faulty_filesystem("enospc", budget=4096, match="part-1")  # the big file hits a full disk midway
    with pytest.raises(OSError) as failed, storage.publishing(out, filesystem=full) as staging:
        write_version(staging, "too big")
        scans = pa.table({"image": [os.urandom(1024) for _ in range(1000)]})
        pq.write_table(scans, f"{staging.path}/status=ok/part-1.parquet", filesystem=staging.filesystem)
    assert failed.value.errno == errno.ENOSPC
    assert out in str(failed.value) and "previous output is unchanged" in str(failed.value)
    assert read_tag(out) == ("good", 3)
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e]


# ---- object store (moto's S3 server) -------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An S3 bucket on the moto server; pyarrow's ``from_uri`` finds it through AWS_ENDPOINT_URL."""
    for key, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"ws-{time.time_ns()}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(bucket)
    return bucket


def test_object_store_publish_flips_a_pointer_and_a_failed_run_changes_nothing(s3):
    out = f"s3://{s3}/ws/image/predictions"
    fs, path = storage.resolve(out)
    # An output written before this scheme, straight under the prefix: replaced on the first publish.
    pq.write_table(pa.table({"tag": ["legacy"]}), f"{path}/status=ok/part-0.parquet", filesystem=fs)
    tokens = []
    for tag in ("v1", "v2"):
        with storage.publishing(out) as staging:
            write_version(staging, tag)
            tokens.append(staging.uri.rsplit("/", 1)[-1])
        assert read_tag(out) == (tag, 3)
    assert storage.published(out) == f"{out}/_v/{tokens[-1]}"
    top = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert top == {"_CURRENT", "_v"}

    with pytest.raises(RuntimeError), storage.publishing(out) as staging:
        write_version(staging, "half")
        raise RuntimeError("killed midway")
    assert read_tag(out) == ("v2", 3)

    with storage.publishing(out) as staging:
        write_version(staging, "v3")
    versions = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{path}/_v"))}
    assert versions == set(tokens[1:]) | {staging.uri.rsplit("/", 1)[-1]}  # current + previous only
    assert json.loads(storage.read_bytes(f"{out}/_CURRENT"))["previous"] == tokens[1]


def test_object_store_overlap_is_refused(s3):
    with pytest.raises(storage.OutputOverlapError, match="contains"):
        storage.refuse_overlap("prepare", f"s3://{s3}/data", [f"s3://{s3}/data/scans/"])


# ---- the real CLI (starts Ray, refuses before any Ray work) ------------------------------------------
def test_predict_with_the_output_over_its_input_is_refused_and_deletes_nothing(tmp_path):
    scans = tmp_path / "data" / "scans"
    scans.mkdir(parents=True)
    for i in range(3):
        (scans / f"{i}.png").write_bytes(b"not really a png %d" % i)
    before = {p.name: p.read_bytes() for p in scans.iterdir()}
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "ray_app", "image", "predict", "--workspace", str(tmp_path / "ws"), "--model", str(tmp_path / "model"),
         "--input", str(scans), "--output", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "refusing to write the output" in done.stderr and str(scans) in done.stderr and str(tmp_path / "data") in done.stderr
    assert {p.name: p.read_bytes() for p in scans.iterdir()} == before
