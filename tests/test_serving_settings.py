"""Serving without Ray: what the model server imports, and how each entry point resolves settings."""

from __future__ import annotations

import subprocess
import sys


def test_model_server_and_app_import_no_torch():
    """A replica given a torch-free loader (e.g. ONNX) must not pay for torch: only loaders import it."""
    probe = "import sys, ray_app.serving.app, ray_app.serving.model_server; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
