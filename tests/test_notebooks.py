"""The walkthrough notebooks: committed without outputs and as ``notebooks/generate.py`` writes them,
and each one runs top to bottom in a fresh kernel (its own local Ray) with the expected results."""

from __future__ import annotations

import importlib.util
import os
import re

import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
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


def venv_kernel(folder: str):
    """A kernel manager whose kernel is this interpreter (the project's venv), whatever kernels
    the machine has installed elsewhere."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    write_kernel_spec(os.path.join(folder, "ray_app_venv"), overrides={"display_name": "ray_app venv"})
    return AsyncKernelManager(kernel_name="ray_app_venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[folder]))


CLEANUP = "import ray\nfrom ray import serve\n\nif ray.is_initialized():\n    serve.shutdown()\n    ray.shutdown()"


def execute(name: str, workdir: str, kernels: str) -> tuple[str, int]:
    """Run the notebook in ``workdir``; returns (all text output, number of PNG figures)."""
    from nbclient import NotebookClient

    notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    cells = len(notebook.cells)
    # Not in the committed notebook: stops Ray even when a cell failed, before the kernel goes
    # (a killed kernel would leave its local Ray's agents running).
    notebook.cells.append(nbformat.v4.new_code_cell(CLEANUP))
    client = NotebookClient(notebook, km=venv_kernel(kernels), timeout=300, resources={"metadata": {"path": workdir}})
    with client.setup_kernel():
        try:
            for index in range(cells):
                client.execute_cell(notebook.cells[index], index)
        finally:
            client.execute_cell(notebook.cells[cells], cells)
            nbformat.write(notebook, os.path.join(workdir, f"{name}.executed.ipynb"))  # to read when a check fails
    texts, figures = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stdout":
                texts.append(output.text)
            data = output.get("data", {})
            texts.append(data.get("text/plain", ""))
            figures += "image/png" in data
    return "\n".join(texts), figures


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
    return float(found.group(1))


@pytest.mark.own_cluster
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end(name, tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    text, figures = execute(name, str(tmp_path), str(kernels))
    assert figures >= 2  # training curves + confusion matrix / calibration (and more)
    assert "Ray stopped" in text
    assert os.path.isdir(tmp_path / "workspace" / f"notebook-{name}" / "models" / name)
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
