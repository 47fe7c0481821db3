"""Upload-triggered predict at upload scale: wall time from an N-file upload (default 200 PNGs) to
every file's prediction, with the watcher's old policy (one Ray job per file) against the new one
(the new files of a poll grouped into one job), on the same ``ray start`` cluster in one run.

Both run the real watcher (``python -m ray_app.watcher start``, an actor on the cluster) with
``--interval-s 1 --min-age-s 0`` and the default ``--max-running-jobs 2``; the clock stops when
every file's record is final. One job per file pays Ray Data's job start-up once per file, so on
this 2-core machine the old policy is measured on ``--per-file-files`` of the N files (default 20;
pass N to measure all) and its N-file time is extrapolated linearly (jobs run two at a time, each
independent), which the output says.

Run: ``python benchmarks/watcher_upload.py [--files 200] [--per-file-files 20]`` (``make bench-watcher``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray_app.demos.data import write_image_folders
from ray_app.local_cluster import start_head, stop_local_cluster
from ray_app.runtime import unused_loopback_port

FINAL = {"SUCCEEDED", "FAILED", "STOPPED", "LOST"}


def client(env: dict[str, str], *argv: str) -> None:
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed:\n{done.stderr[-3000:]}")


def file_records(state: Path) -> list[dict]:
    if not state.is_dir():
        return []
    found = []
    for path in state.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            pass  # being replaced right now
    return found


def upload_run(env: dict, address: str, ws: str, sources: list[str], folder: Path, label: str, group: bool) -> dict:
    """Copy the files into a fresh upload folder, start a watcher, wait for every file's record."""
    uploads, state, output = folder / "uploads", folder / "state", folder / "predictions"
    uploads.mkdir(parents=True)
    for i, source in enumerate(sources):
        shutil.copy(source, uploads / f"scan-{i:04d}.png")
    name = f"bench-{label}"
    settings = ["--workload", "image", "--input", str(uploads), "--state", str(state), "--output", str(output)]
    settings += ["--interval-s", "1", "--min-age-s", "0", *([] if group else ["--max-files-per-job", "1"])]
    started = time.perf_counter()
    client(env, "-m", "ray_app.watcher", "start", "--name", name, "--address", address, "--workspace", ws, *settings,
           "--", "--concurrency", "1", "--batch-size", "64")  # fmt: skip
    while True:
        records = file_records(state)
        if len(records) == len(sources) and all(r["status"] in FINAL for r in records):
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    client(env, "-m", "ray_app.watcher", "stop", "--name", name, "--address", address)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"files": len(sources), "jobs": len({r["job"] for r in records}), "seconds": round(seconds, 1), "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--per-file-files", type=int, default=20, help="files measured with one job per file (then extrapolated)")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="watcher-bench-"))
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    cluster = start_head(unused_loopback_port(), "--num-cpus=4", env=env, node_ip="127.0.0.1")
    try:
        ws, data = str(folder / "ws"), folder / "digits"
        write_image_folders(str(data), limit=max(args.files, 120), broken=False)
        at = ["--address", cluster.gcs_address, "--workspace", ws]
        client(env, "-m", "ray_app", "image", "prepare", *at, "--input", str(data))
        client(env, "-m", "ray_app", "image", "train", *at, "--run-name", "b", "--epochs", "1", "--num-workers", "1")
        client(env, "-m", "ray_app", "image", "register", *at, "--run-name", "b", "--alias", "production")
        sources = sorted(str(p) for p in data.rglob("*.png"))[: args.files]

        grouped = upload_run(env, cluster.gcs_address, ws, sources, folder / "grouped", "grouped", group=True)
        sample = sources[: args.per_file_files]
        per_file = upload_run(env, cluster.gcs_address, ws, sample, folder / "per-file", "per-file", group=False)
        per_file_n = per_file["seconds"] * len(sources) / len(sample)
        result = {
            "files": len(sources),
            "grouped (new)": grouped,
            "one job per file (old)": per_file,
            f"one job per file, {len(sources)} files": {
                "seconds": round(per_file_n, 1),
                "how": "measured" if len(sample) == len(sources) else f"extrapolated from {len(sample)} files",
            },
            "speed-up": round(per_file_n / grouped["seconds"], 1),
        }
        print(json.dumps(result, indent=2))
    finally:
        stop_local_cluster(cluster)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
