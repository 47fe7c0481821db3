"""Runs the walkthrough notebooks (notebooks/*.ipynb) top to bottom in a fresh kernel of this venv,
on the session's shared cluster (``shared_head``: the kernel's ``connect()`` joins it through
``RAY_ADDRESS``, as a notebook on a cluster's head would), with smaller data and fewer epochs
injected after each notebook's ``parameters`` cell (papermill's convention).

``notebook_run`` (session-scoped, exposed by tests/conftest.py) runs each notebook at most once a
session: tests/test_notebooks.py checks its outputs, and the upload watcher test reuses the image
notebook's workspace (prepared data + a registered ``production`` model) instead of training again.
"""

from __future__ import annotations

import os

import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
# Enough to see the behaviour each notebook shows (learning above the majority class, a calibrated
# click model); the notebooks' own defaults are for reading, not for the test's clock. One training
# worker: DDP over two is the image chain's and the recovery tests' (main session); here a second
# worker and its data-split coordinators only cost process start-ups on 2 cores.
TEST_PARAMETERS = {
    "image": {"IMAGES": 500, "EPOCHS": 6, "WORKERS": 1},
    "text": {"REVIEWS": 120, "EPOCHS": 1, "WORKERS": 1},
    "ctr": {"EVENTS": 10000, "EPOCHS": 2, "WORKERS": 1},
}
CLEANUP = "import ray\nfrom ray import serve\n\nif ray.is_initialized():\n    serve.shutdown()\n    ray.shutdown()"


def venv_kernel(folder: str):
    """A kernel manager whose kernel is this interpreter (the project's venv), whatever kernels
    the machine has installed elsewhere."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    write_kernel_spec(os.path.join(folder, "ray_app_venv"), overrides={"display_name": "ray_app venv"})
    return AsyncKernelManager(kernel_name="ray_app_venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[folder]))


def with_parameters(notebook: nbformat.NotebookNode, values: dict[str, int]) -> nbformat.NotebookNode:
    """A cell tagged ``injected-parameters`` right after the one tagged ``parameters``."""
    (index,) = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, cell)
    return notebook


def execute(name: str, workdir: str, env: dict[str, str], parameters: dict[str, int]) -> tuple[str, int]:
    """Run the notebook in ``workdir``; returns (all text output, number of PNG figures)."""
    from nbclient import NotebookClient

    kernels = os.path.join(workdir, "kernels")
    os.makedirs(kernels, exist_ok=True)
    notebook = with_parameters(nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4), parameters)
    cells = len(notebook.cells)
    # Not in the committed notebook: stops Serve and disconnects even when a cell failed, before
    # the kernel goes (the next notebook finds the cluster as this one found it).
    notebook.cells.append(nbformat.v4.new_code_cell(CLEANUP))
    client = NotebookClient(notebook, km=venv_kernel(kernels), timeout=300, resources={"metadata": {"path": workdir}})
    with client.setup_kernel(env=env):
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


@pytest.fixture(scope="session")
def notebook_run(shared_head, tmp_path_factory):
    """``notebook_run(name)`` -> {"text", "figures", "workspace"}; each notebook runs once."""
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            workdir = tmp_path_factory.mktemp(f"notebook-{name}")
            env = {**shared_head["env"], "RAY_ADDRESS": shared_head["address"]}
            text, figures = execute(name, str(workdir), env, TEST_PARAMETERS[name])
            done[name] = {"text": text, "figures": figures, "workspace": str(workdir / "workspace" / f"notebook-{name}")}
        return done[name]

    return run
