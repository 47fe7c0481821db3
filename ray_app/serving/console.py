"""What the try-it page (the model console) needs beyond predictions: each workload's registry
record — its versions with when and from which data they were trained and their metrics, and the
history of its aliases — and a viewable preview of an uploaded DICOM file (browsers show PNG and
JPEG themselves, not DICOM).

Plain functions over the registry files and the DICOM decoder, so the gateway stays free of torch
and tests call them without Ray.
"""

from __future__ import annotations

import io
from typing import Any

# From a version's metadata.json: what a model card shows. The full resolved config stays out (it
# is large, and the registry keeps it for whoever needs it).
CARD_FIELDS = ("version", "registered_at", "run_name", "data", "data_fingerprint", "training_metrics", "evaluation")
HISTORY_FIELDS = ("seq", "alias", "from", "to", "kind", "at", "user", "reason")
PREVIEW_SIZE = 256  # pixels on the long side: enough to recognise the image, small to send


def registry_record(models_uri: str, workload: str) -> dict[str, Any]:
    """``{"aliases", "versions", "history"}`` for one workload: every complete version's card
    (oldest first) and every alias move (oldest first). An empty record when nothing is registered."""
    from ray_app.registry import ModelRegistry

    registry = ModelRegistry(models_uri)
    versions = []
    for version in registry.versions(workload):
        metadata = registry.metadata(workload, version)
        versions.append({key: metadata.get(key) for key in CARD_FIELDS})
    history = [{key: move.get(key) for key in HISTORY_FIELDS} for move in registry.alias_history(workload)]
    return {"workload": workload, "aliases": registry.aliases(workload), "versions": versions, "history": history}


def dicom_preview_png(data: bytes) -> bytes:
    """A DICOM file as a greyscale/RGB PNG, windowed with the file's own window (min–max when it
    has none), as the image workload decodes it by default. Raises ``ValueError`` with the reason
    when the file is not a DICOM image we can decode. Carries no tag values, only pixels."""
    from PIL import Image

    from ray_app.workloads import dicom

    if not (dicom.has_preamble(data) or dicom.looks_like_raw_dicom(data)):
        raise ValueError("not a DICOM file: PNG and JPEG are shown by the browser itself")
    decoded = dicom.decode_dicom(data, size=PREVIEW_SIZE, channels=3, window=["file"])
    chw = decoded.chw
    pixels = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
