"""The registry under faults, without Ray: concurrent writers (real processes), damaged files, a full
disk (ENOSPC from a wrapping filesystem), SIGKILL mid-write, and S3 semantics against moto's server.
Each test checks that nothing is lost and that the error names what is wrong."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from ray_app.bundle_format import BUNDLE_FILE, WEIGHTS_FILE, UnsupportedBundleFormat
from ray_app.registry import ALIASES_FILE, HISTORY_FOLDER, METADATA_FILE, ModelRegistry, RegistryCorrupt, RegistryWriteError

HERE = os.path.dirname(os.path.abspath(__file__))
FROZEN_BUNDLE = os.path.join(HERE, "data", "frozen_bundle_v1")
PROCESSES = 4
REGISTERS_PER_PROCESS = 3


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def bundle(tmp_path) -> str:
    """A real (tiny) saved bundle to register."""
    folder = str(tmp_path / "bundle")
    shutil.copytree(FROZEN_BUNDLE, folder)
    return folder


def registry_json_files(root: str) -> list[str]:
    """Every JSON file a reader might open (temporary files are dot-names, never read)."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".json") and not f.startswith(".")]


def assert_every_file_parses(root: str) -> None:
    for path in registry_json_files(root):
        with open(path) as f:
            json.load(f)


# ---- concurrent writers (real processes) ---------------------------------------------------------
def _register_many(root: str, bundle: str, barrier, results) -> None:
    registry = ModelRegistry(root)
    barrier.wait()  # all processes start registering at the same moment
    results.put([registry.register("image", bundle, {"pid": os.getpid()}) for _ in range(REGISTERS_PER_PROCESS)])


def _move_many(root: str, barrier, worker: int, moves: int) -> None:
    registry = ModelRegistry(root)
    barrier.wait()
    for j in range(moves):
        registry.move_alias("image", "production", 1 + (worker + j) % 3, reason=f"w{worker}-m{j}", user=f"worker{worker}")


def run_processes(target, args_per_process: list[tuple]) -> None:
    context = multiprocessing.get_context("spawn")  # no fork: the test process may hold Ray's threads
    barrier = context.Barrier(len(args_per_process))
    processes = [context.Process(target=target, args=_with_barrier(args, barrier)) for args in args_per_process]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


def _with_barrier(args: tuple, barrier) -> tuple:
    """Insert the barrier after the leading root/bundle arguments (the workers' signatures)."""
    split = args.index("<barrier>")
    return (*args[:split], barrier, *args[split + 1 :])


def test_concurrent_registers_get_distinct_complete_versions(tmp_path, bundle):
    root = str(tmp_path / "models")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    run_processes(_register_many, [(root, bundle, "<barrier>", results) for _ in range(PROCESSES)])
    claimed = [v for _ in range(PROCESSES) for v in results.get(timeout=10)]
    total = PROCESSES * REGISTERS_PER_PROCESS
    assert sorted(claimed) == list(range(1, total + 1)), "every call got its own version number"
    registry = ModelRegistry(root)
    assert registry.versions("image") == list(range(1, total + 1))
    weights_sha = sha256(os.path.join(bundle, WEIGHTS_FILE))
    for version in claimed:
        folder = registry.version_uri("image", version)
        assert sha256(os.path.join(folder, WEIGHTS_FILE)) == weights_sha, f"version {version} has whole weights"
        assert registry.metadata("image", version)["version"] == version


def test_concurrent_alias_moves_lose_no_move_and_keep_from_exact(tmp_path, bundle):
    root = str(tmp_path / "models")
    registry = ModelRegistry(root)
    for _ in range(3):
        registry.register("image", bundle, {})
    moves = 5
    run_processes(_move_many, [(root, "<barrier>", worker, moves) for worker in range(PROCESSES)])
    history = registry.alias_history("image", "production")
    assert len(history) == PROCESSES * moves
    assert sorted(r["reason"] for r in history) == sorted(f"w{w}-m{j}" for w in range(PROCESSES) for j in range(moves))
    assert [r["seq"] for r in history] == list(range(1, len(history) + 1))
    for before, after in zip(history, history[1:], strict=False):
        assert after["from"] == before["to"], "each record's 'from' is what the alias really pointed to"
    assert registry.aliases("image") == {"production": history[-1]["to"]}
    with open(os.path.join(root, "image", ALIASES_FILE)) as f:
        assert json.load(f) == {"production": history[-1]["to"]}, "aliases.json ends at the newest move"


# ---- history and rollback ------------------------------------------------------------------------
def test_every_move_is_recorded_and_rollback_walks_back(tmp_path, bundle, monkeypatch):
    monkeypatch.setenv("RAY_APP_USER", "alice")
    registry = ModelRegistry(str(tmp_path / "models"))
    v1 = registry.register("image", bundle, {}, alias="production")
    v2 = registry.register("image", bundle, {}, alias="production", reason="nightly", metrics={"accuracy": 0.9})
    v3 = registry.register("image", bundle, {})
    moved = registry.move_alias("image", "production", v3, reason="manual", metrics={"accuracy": 0.91}, user="bob")
    assert (moved["from"], moved["to"], moved["user"], moved["reason"]) == (v2, v3, "bob", "manual")
    history = registry.alias_history("image", "production")
    assert [(r["from"], r["to"], r["kind"]) for r in history] == [(None, v1, "register"), (v1, v2, "register"), (v2, v3, "move")]
    assert history[1]["user"] == "alice" and history[1]["metrics"] == {"accuracy": 0.9} and history[1]["at"]
    back = registry.rollback("image", "production")
    assert (back["from"], back["to"], back["kind"]) == (v3, v2, "rollback")
    assert registry.resolve_version("image", "production") == v2
    assert registry.rollback("image", "production")["to"] == v1, "a second rollback goes one further back"
    with pytest.raises(LookupError, match="no earlier version"):
        registry.rollback("image", "production")
    assert registry.resolve_version("image", "production") == v1
    with pytest.raises(ValueError, match="no version 9"):
        registry.move_alias("image", "production", 9, reason="typo")


def test_registry_written_before_the_history_still_reads_and_moves(tmp_path, bundle):
    """The old layout: numbered folders without claim.json, aliases.json only."""
    root = tmp_path / "models" / "image"
    for version in (1, 2):
        shutil.copytree(bundle, root / str(version))
        (root / str(version) / METADATA_FILE).write_text(json.dumps({"version": version}))
    (root / ALIASES_FILE).write_text(json.dumps({"production": 2}))
    registry = ModelRegistry(str(tmp_path / "models"))
    assert registry.resolve_version("image", "production") == 2
    assert registry.register("image", bundle, {}) == 3
    assert registry.move_alias("image", "production", 3, reason="upgrade")["from"] == 2
    assert registry.rollback("image", "production")["to"] == 2


# ---- damaged files -------------------------------------------------------------------------------
def test_damaged_files_raise_errors_naming_the_file(tmp_path, bundle):
    from ray_app.bundle import BundleError, load_bundle

    root = tmp_path / "models"
    registry = ModelRegistry(str(root))
    registry.register("image", bundle, {})
    registry.register("image", bundle, {})
    aliases_json = root / "image" / ALIASES_FILE

    # A registry from before the history: aliases.json is the only pointer.
    aliases_json.write_text('{"production": ')
    with pytest.raises(RegistryCorrupt, match=str(aliases_json)):
        registry.resolve_version("image", "production")
    aliases_json.write_text('["production", 1]')
    with pytest.raises(RegistryCorrupt, match="alias names to version numbers"):
        registry.aliases("image")

    # With a history, a damaged aliases.json is only a stale copy: reads go on, the next move repairs it.
    aliases_json.unlink()
    registry.move_alias("image", "production", 1, reason="first")
    aliases_json.write_text("{")
    assert registry.resolve_version("image", "production") == 1
    registry.move_alias("image", "production", 2, reason="second")
    assert json.loads(aliases_json.read_text()) == {"production": 2}

    newest = root / "image" / HISTORY_FOLDER / "0000000002.json"
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.raises(RegistryCorrupt, match=str(newest)) as caught:
        registry.resolve_version("image", "production")
    assert "not valid JSON" in str(caught.value)
    with pytest.raises(RegistryCorrupt, match=str(newest)):
        registry.move_alias("image", "production", 1, reason="must not guess the current state")

    metadata = root / "image" / "1" / METADATA_FILE
    metadata.write_text('{"version": 1, "evalu')
    with pytest.raises(RegistryCorrupt, match=str(metadata)):
        registry.metadata("image", 1)
    with pytest.raises(BundleError, match=str(metadata)):
        load_bundle(registry.version_uri("image", 1))
    bundle_json = root / "image" / "2" / BUNDLE_FILE
    bundle_json.write_text("")
    with pytest.raises(BundleError, match=str(bundle_json)):
        load_bundle(registry.version_uri("image", 2))


# ---- full disk (ENOSPC through a wrapping filesystem) --------------------------------------------
@pytest.mark.parametrize("budget", [0, 60], ids=["disk-full", "full-after-60-bytes"])
def test_full_disk_leaves_the_previous_state_whole_and_says_so(tmp_path, bundle, budget):
    from fault_fs import faulty_filesystem

    root = str(tmp_path / "models")
    healthy = ModelRegistry(root)
    healthy.register("image", bundle, {}, alias="production")
    healthy.register("image", bundle, {})
    aliases_json = os.path.join(root, "image", ALIASES_FILE)
    before = open(aliases_json, "rb").read()
    history_before = healthy.alias_history("image")

    full = ModelRegistry(root, filesystem=faulty_filesystem("enospc", budget))
    with pytest.raises(RegistryWriteError) as caught:
        full.move_alias("image", "production", 2, reason="disk is full")
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value) and root in str(caught.value)
    assert "previous state" in str(caught.value)
    assert open(aliases_json, "rb").read() == before, "aliases.json is byte-for-byte what it was"
    assert healthy.resolve_version("image", "production") == 1
    assert healthy.alias_history("image") == history_before

    with pytest.raises(RegistryWriteError, match="No space left on device"):
        full.register("image", bundle, {}, alias="production")
    assert healthy.versions("image") == [1, 2], "a version that could not be written is never listed"
    assert healthy.resolve_version("image", "production") == 1
    assert not [f for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")], "no temporary files left behind"
    assert_every_file_parses(root)
    # Space is back: the registry works on, numbering past whatever the failed call had claimed.
    version = healthy.register("image", bundle, {}, alias="production")
    assert version > 2 and healthy.resolve_version("image", "production") == version


def test_disk_full_at_each_later_write_of_register_and_move(tmp_path, bundle, caplog):
    from fault_fs import faulty_filesystem

    root = str(tmp_path / "models")
    healthy = ModelRegistry(root)
    healthy.register("image", bundle, {}, alias="production")
    aliases_json = os.path.join(root, "image", ALIASES_FILE)

    # The disk fills while the weights are copied: the claimed number stays unused, nothing is listed.
    weights_full = ModelRegistry(root, filesystem=faulty_filesystem("enospc", 1000, WEIGHTS_FILE))
    with pytest.raises(RegistryWriteError, match=rf"{WEIGHTS_FILE}: .*No space left on device"):
        weights_full.register("image", bundle, {}, alias="production")
    assert healthy.versions("image") == [1] and healthy.resolve_version("image", "production") == 1

    # The disk fills after the move's record, while aliases.json is refreshed: the move is recorded
    # and in effect, the old aliases.json stays whole, the problem is logged, the next move repairs it.
    v2 = healthy.register("image", bundle, {})
    before = open(aliases_json, "rb").read()
    aliases_full = ModelRegistry(root, filesystem=faulty_filesystem("enospc", 5, ALIASES_FILE))
    with caplog.at_level("WARNING", logger="ray_app.registry"):
        record = aliases_full.move_alias("image", "production", v2, reason="disk fills late")
    assert record["to"] == v2 and healthy.resolve_version("image", "production") == v2
    assert open(aliases_json, "rb").read() == before
    assert "No space left on device" in caplog.text and "recorded in" in caplog.text
    healthy.rollback("image", "production")
    assert json.loads(open(aliases_json).read()) == {"production": 1}


def test_rollback_cli_prints_the_move_and_refuses_when_there_is_nothing_before(tmp_path, bundle, capsys):
    from ray_app.cli import run_cli

    workspace = str(tmp_path / "ws")
    registry = ModelRegistry(os.path.join(workspace, "models"))
    registry.register("image", bundle, {}, alias="production")
    registry.register("image", bundle, {}, alias="production")
    result = run_cli(["image", "rollback", "--workspace", workspace, "--alias", "production", "--reason", "bad release"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["from"], printed["to"], printed["reason"]) == (2, 1, "bad release") == (result["from"], result["to"], result["reason"])
    assert printed["dashboard"] is None, "rollback neither starts nor joins Ray"
    with pytest.raises(SystemExit, match="error: image alias 'production' has no earlier version"):
        run_cli(["image", "rollback", "--workspace", workspace, "--alias", "production"])
    assert registry.resolve_version("image", "production") == 1


# ---- SIGKILL mid-write ---------------------------------------------------------------------------
_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from fault_fs import faulty_filesystem
from ray_app.registry import ModelRegistry
registry = ModelRegistry({root!r}, filesystem=faulty_filesystem("stall", 20, {match!r}))
{call}
"""


def kill_mid_write(root: str, match: str, call: str) -> str:
    """Run ``call`` in a child whose writes to files named like ``match`` stall after 20 bytes;
    SIGKILL it as soon as it is mid-write. Returns the file it was writing."""
    code = _CHILD.format(tests=HERE, root=root, match=match, call=call)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("MIDWRITE "), f"child never reached the write: {line!r}"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    return line.split(" ", 1)[1].strip()


def test_sigkill_mid_write_leaves_the_previous_state_readable(tmp_path, bundle):
    root = str(tmp_path / "models")
    registry = ModelRegistry(root)
    registry.register("image", bundle, {}, alias="production")
    registry.register("image", bundle, {})

    # Killed while writing the move's history record: the move never happened.
    partial = kill_mid_write(root, "00000", "registry.move_alias('image', 'production', 2, reason='killed')")
    assert os.path.basename(partial).startswith("."), "the half-written bytes went to a temporary name"
    assert registry.resolve_version("image", "production") == 1 and len(registry.alias_history("image")) == 1
    assert_every_file_parses(root)

    # Killed while refreshing aliases.json after the record: the move is in effect, the old file intact.
    kill_mid_write(root, ALIASES_FILE, "registry.move_alias('image', 'production', 2, reason='killed later')")
    assert registry.resolve_version("image", "production") == 2
    assert json.loads(open(os.path.join(root, "image", ALIASES_FILE)).read()) == {"production": 1}
    assert_every_file_parses(root)
    registry.rollback("image", "production")
    assert json.loads(open(os.path.join(root, "image", ALIASES_FILE)).read()) == {"production": 1}, "next move repairs it"

    # Killed while copying a new version's weights: that version is never listed; the next gets a new number.
    kill_mid_write(root, WEIGHTS_FILE, f"registry.register('image', {bundle!r}, {{}}, alias='production')")
    assert registry.versions("image") == [1, 2] and registry.resolve_version("image", "production") == 1
    assert registry.register("image", bundle, {}) == 4
    assert_every_file_parses(root)


# ---- bundle format version -----------------------------------------------------------------------
def _digit_pngs() -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = [i for i, t in enumerate(digits.target) if t < 3][:6]
    pngs = []
    for i in keep:
        buffer = io.BytesIO()
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def test_frozen_v1_bundle_still_loads_and_predicts_the_same():
    """Written by the code of commit d81bd79 (tests/data/make_frozen_bundle_v1.py); no format_version field."""
    from ray_app.bundle import load_bundle

    with open(os.path.join(FROZEN_BUNDLE, BUNDLE_FILE)) as f:
        assert "format_version" not in json.load(f)
    with open(os.path.join(HERE, "data", "frozen_bundle_v1.expected.json")) as f:
        expected = json.load(f)
    bundle = load_bundle(FROZEN_BUNDLE)
    items = [bundle.workload.decode_item(png, bundle.options, bundle.manifest) for png in _digit_pngs()]
    probabilities = bundle.predict_proba(bundle.workload.stack_items(items, bundle.options, bundle.manifest))
    np.testing.assert_allclose(probabilities, np.array(expected["probabilities"]), atol=1e-5)
    assert probabilities.argmax(axis=1).tolist() == expected["labels"]


def test_new_bundles_carry_a_format_version_and_future_ones_are_refused(tmp_path, bundle):
    from ray_app.bundle import BUNDLE_FORMAT_VERSION, load_bundle, save_bundle

    model = load_bundle(FROZEN_BUNDLE)
    saved = str(tmp_path / "saved")
    save_bundle(model.model, saved, {k: v for k, v in model.info.items() if k != "weights_sha256"})
    with open(os.path.join(saved, BUNDLE_FILE)) as f:
        assert json.load(f)["format_version"] == BUNDLE_FORMAT_VERSION == 1
    assert load_bundle(saved).classes == ["0", "1", "2"]

    info_path = os.path.join(bundle, BUNDLE_FILE)
    with open(info_path) as f:
        info = json.load(f)
    with open(info_path, "w") as f:
        json.dump({**info, "format_version": 2}, f)
    with pytest.raises(UnsupportedBundleFormat, match=r"format_version 2 .*newer ray_app"):
        load_bundle(bundle)
    registry = ModelRegistry(str(tmp_path / "models"))
    with pytest.raises(UnsupportedBundleFormat, match=str(info_path)):
        registry.register("image", bundle, {}, alias="production")
    assert registry.versions("image") == [], "nothing registered that nobody could load"


# ---- object-store semantics against a real S3 API (moto's server) --------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_models(s3_endpoint, monkeypatch, request) -> str:
    import boto3

    # One set of AWS_* settings that both pyarrow and boto3 read, as on a real cluster.
    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = "models-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/registry"


def _register_on_s3(root: str, bundle: str, barrier, results) -> None:
    _register_many(root, bundle, barrier, results)


def test_s3_registry_concurrent_registers_moves_and_rollback(s3_models, bundle):
    from ray_app.bundle import load_bundle

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    run_processes(_register_on_s3, [(s3_models, bundle, "<barrier>", results) for _ in range(PROCESSES)])
    claimed = sorted(v for _ in range(PROCESSES) for v in results.get(timeout=10))
    total = PROCESSES * REGISTERS_PER_PROCESS
    assert claimed == list(range(1, total + 1))
    registry = ModelRegistry(s3_models)
    assert registry.versions("image") == list(range(1, total + 1))

    # The create-only write is what serialises writers: a second create of one name is refused.
    assert registry.store.create("image/probe.json", b"{}") is True
    assert registry.store.create("image/probe.json", b"{}") is False

    registry.move_alias("image", "production", 2, reason="first")
    registry.move_alias("image", "production", 5, reason="second")
    assert registry.rollback("image", "production")["to"] == 2
    assert registry.aliases("image") == {"production": 2}
    assert registry.store.read_json(f"image/{ALIASES_FILE}") == {"production": 2}
    loaded = load_bundle(registry.version_uri("image", registry.resolve_version("image", "production")))
    assert loaded.info["version"] == 2 and loaded.classes == ["0", "1", "2"]

    registry.store.replace(f"image/{HISTORY_FOLDER}/0000000003.json", b'{"alias": "prod')
    with pytest.raises(RegistryCorrupt, match=f"{s3_models}/image/{HISTORY_FOLDER}/0000000003.json"):
        registry.resolve_version("image", "production")
