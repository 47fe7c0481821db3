"""The walkthrough notebooks: committed without outputs and as ``notebooks/generate.py`` writes them,
and each one runs top to bottom in a fresh kernel with the expected results (on the session's shared
cluster, with the smaller data of tests/notebook_runner.py)."""

from __future__ import annotations

import importlib.util
import os
import re

import nbformat
import pytest
from notebook_runner import NOTEBOOKS

NAMES = ["image", "text", "ctr"]


def generator():
    spec = importlib.util.spec_from_file_location("notebook_generator", os.path.join(NOTEBOOKS, "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_generated_and_has_no_outputs(name):
    with open(os.path.join(NOTEBOOKS, f"{name}.ipynb")) as f:
        committed = f.read()
    assert committed == generator().render(name), "notebooks/generate.py and the committed notebook differ: regenerate"
    notebook = nbformat.reads(committed, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in notebook.cells) >= len(code) // 2  # every step is explained
    # One cell holds the knobs a run may change (tests/notebook_runner.py injects smaller ones after it).
    assert [c.metadata.get("tags") for c in code if "parameters" in c.metadata.get("tags", [])] == [["parameters"]]


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
    return float(found.group(1))


@pytest.mark.own_cluster
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end(name, notebook_run):
    done = notebook_run(name)
    text = done["text"]
    assert done["figures"] >= 2  # training curves + confusion matrix / calibration (and more)
    assert "Ray stopped" in text
    assert os.path.isdir(os.path.join(done["workspace"], "models", name))
    if name == "image":
        accuracy = number(r"test accuracy: ([0-9.]+)", text)
        assert accuracy > number(r"majority class: ([0-9.]+)", text) + 0.2
        assert re.search(r"HTTP 200: a 7 -> \[\{'label': '\d'", text)
        assert "HTTP 422" in text
    elif name == "text":
        assert 0 <= number(r"test accuracy: ([0-9.]+)", text) <= 1
        answer = re.search(r"HTTP 200: (\[.*\])", text)
        assert (
            answer
            and answer.group(1).count("'label': ") == 2
            and set(re.findall(r"'label': '(\w+)'", answer.group(1)))
            <= {
                "fresh",
                "rotten",
            }
        )
        assert "HTTP 422" in text
    else:
        assert 0.5 < number(r"test AUC: ([0-9.]+)", text) <= 1
        probabilities = re.search(r"HTTP 200: \{.*'click_probability': \[([0-9., ]+)\]", text)
        assert probabilities and len([float(p) for p in probabilities.group(1).split(",")]) == 3
        assert re.search(r"HTTP 422: .*age", text)
        # The user's new events reach Redis and change that user's next prediction (not degraded).
        assert "events: (200, {'ingested': 3" in text
        before = number(r"before: 200 \[([0-9.]+)\] degraded: False", text)
        assert before != number(r"after:  200 \[([0-9.]+)\] degraded: False", text)
