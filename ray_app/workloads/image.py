"""Image classification (e.g. medical scans): class-per-folder PNG/JPEG files or MedMNIST ``.npz``,
decoded with Pillow; the model lives in ``image_model.py``. torch is imported lazily here so the
Ray Data decode actors start without paying for it.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator

from ray_app import storage
from ray_app.workloads import dicom, medical_labels
from ray_app.workloads.base import (
    DATA,
    MODEL,
    STATUS_OK,
    STATUS_REJECTED,
    BadInput,
    PrepareInputs,
    Workload,
    arrow_blocks,
    assign_split,
    stable_order,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NPZ_SPLITS = {"train": "train", "val": "val", "test": "test"}  # MedMNIST key prefixes -> our splits
# Formats Pillow may open. Every other decoder Pillow ships (TIFF, GIF, PSD, ICO, ...) is attack
# surface an upload endpoint does not need. DICOM is not a Pillow format: it is recognised by its
# preamble and decoded with pydicom *before* this list is consulted (the medical hook in
# ``decode_image``), under the same pixel cap.
PIL_FORMATS = ("PNG", "JPEG")
# Pillow only *warns* (DecompressionBombWarning) between 89 M and 178 M pixels and decodes anyway
# (0.5-0.9 GB per image). Our cap is checked on the header before any pixel is decoded and may not
# exceed Pillow's warning threshold, so that warning can never be reached by a decoded image.
DEFAULT_MAX_PIXELS = 40_000_000

PREPARED_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("image", pa.binary()),  # uint8 C×H×W, shape recorded in the manifest
        ("status", pa.string()),
        ("reject_reason", pa.string()),
        # Salted hashes (medical_labels.pseudonym), never the ids themselves; null when unknown.
        ("patient", pa.string()),
        ("study", pa.string()),
    ]
)


class ImageOptions(BaseModel):
    image_size: int = Field(28, gt=0, description="images are resized to size×size")
    channels: int = Field(1, description="1 (grayscale) or 3 (RGB)", ge=1, le=3)
    class_names: list[str] | None = Field(None, description="names for .npz integer labels")
    max_file_bytes: int = Field(32 * 1024 * 1024, gt=0, description="larger files are rejected (checked before reading)")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        gt=0,
        le=Image.MAX_IMAGE_PIXELS,
        description="width x height above which an image is rejected from its header, before decoding",
    )
    width: int = Field(16, gt=0, description="channels of the first ResNet stage (doubles twice)")
    # Medical imaging (DICOM, label manifests, patients): see workloads/dicom.py and medical_labels.py.
    window: list[str] = Field(
        default_factory=lambda: ["file"],
        description="DICOM window: 'file' (the file's Window Center/Width), 'minmax', a preset "
        f"({', '.join(dicom.WINDOW_PRESETS)}) or 'C W' in modality units (HU for CT)",
    )
    labels_manifest: str | None = Field(None, description="CSV/Parquet of labels (path or SOPInstanceUID, label(s), PatientID, study)")
    no_finding_label: str = Field("No Finding", description="in a multi-label manifest, the label that means no finding")
    split_by: Literal["patient", "path"] = Field(
        "patient", description="patient: all images of a patient in one split (PatientID from manifest or file); path: per file"
    )
    hash_paths: bool = Field(False, description="key rows without a SOPInstanceUID by a salted hash of the path, not the path")
    threshold_rule: str = Field(
        "youden",
        description="how evaluate picks each finding's decision threshold on the validation split: 'youden', "
        "'sensitivity:0.95' (screening: highest threshold reaching it) or 'specificity:0.95' (rule-in)",
    )

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> list[str]:
        return dicom.parse_window(value)

    @field_validator("threshold_rule")
    @classmethod
    def _threshold_rule(cls, value: str) -> str:
        from ray_app.workloads.clinical_metrics import parse_threshold_rule  # light: scipy/sklearn load where used

        return parse_threshold_rule(value)


def _to_chw(img: Image.Image, size: int, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_dicom(data: bytes, size: int, channels: int, window: list[str] | None, max_pixels: int) -> dicom.DicomImage:
    try:
        return dicom.decode_dicom(data, size, channels, window or ["file"], max_pixels)
    except dicom.DicomRejected as exc:
        raise BadInput(str(exc)) from None


def decision_thresholds(manifest: dict[str, Any]) -> list[float] | None:
    """Per-finding thresholds saved with a multi-label model (chosen on the validation split at
    evaluate); 0.5 until then."""
    if manifest.get("task") != "multilabel":
        return None
    chosen = manifest.get("decision_thresholds", {}).get("thresholds", {})
    return [float(chosen.get(name, 0.5)) for name in manifest["classes"]]


def decode_file(data: bytes, options: ImageOptions, name: str = "") -> tuple[np.ndarray, dicom.DicomImage | None]:
    """Any accepted file -> (uint8 C×H×W, the DICOM keys or None): what prepare and batch predict
    need to key rows by SOPInstanceUID and split by patient."""
    o = options
    if not data:
        raise BadInput("empty file")
    if len(data) > o.max_file_bytes:
        raise BadInput(f"file too large: {len(data)} bytes > limit {o.max_file_bytes}")
    if dicom.has_preamble(data) or (name.lower().endswith(".dcm") and dicom.looks_like_raw_dicom(data)):
        image = _decode_dicom(data, o.image_size, o.channels, o.window, o.max_pixels)
        return image.chw, image
    return decode_image(data, o.image_size, o.channels, o.max_file_bytes, o.max_pixels, o.window, name), None


def decode_image(
    data: bytes,
    size: int,
    channels: int,
    max_bytes: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: list[str] | None = None,
    name: str = "",
) -> np.ndarray:
    """Encoded image bytes -> uint8 C×H×W. Raises BadInput with a reason a person can act on.

    Only the header is parsed before the limits are checked: an image over ``max_pixels`` or in a
    format outside ``PIL_FORMATS`` is refused without decoding a single pixel."""
    if not data:
        raise BadInput("empty file")
    if len(data) > max_bytes:
        raise BadInput(f"file too large: {len(data)} bytes > limit {max_bytes}")
    # Medical hook: DICOM (b"DICM" at byte 128) is dispatched here, before Pillow, to a pydicom
    # decoder that applies the same ``max_pixels`` check to Rows x Columns of the decoded frame.
    if dicom.has_preamble(data):
        return _decode_dicom(data, size, channels, window, max_pixels).chw
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise BadInput(f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels}")
        # JPEG can decode at reduced scale directly: far cheaper than decode-then-shrink.
        img.draft("L" if channels == 1 else "RGB", (size, size))
        return _to_chw(img, size, channels)
    except BadInput:
        raise
    except UnidentifiedImageError:
        if dicom.looks_like_raw_dicom(data) or name.lower().endswith(".dcm"):  # DICOM without preamble: a forced read
            return _decode_dicom(data, size, channels, window, max_pixels).chw
        raise BadInput(f"not an image in an accepted format ({', '.join(PIL_FORMATS)}, DICOM)") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"corrupt or truncated image: {exc}") from None


def read_failure(exc: OSError) -> str:
    """The reject reason for a file that could not be read, without the path an OSError's message
    carries: export folders are often named after the patient, and the row's key already says which
    file it was (hashed with --hash-paths)."""
    return f"cannot read file: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}"


def file_uri(input_uri: str, fs_path: str) -> str:
    """Re-attach the scheme that pyarrow strips from remote paths."""
    return f"{input_uri.split('://', 1)[0]}://{fs_path}" if storage.is_remote(input_uri) else fs_path


def pixel_statistics(prepared_uri: str, shape: list[int], sample_rows: int = 4096) -> dict[str, list[float]] | None:
    """Per-channel mean/std from a sample of training rows (read back from Parquet once, rather
    than computed per row in the decode hot path)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from ray_app.prepared import ok_uri  # through the published version (a pointer on object stores)

    fs, path = storage.resolve(ok_uri(prepared_uri))
    if fs.get_file_info(path).type.name == "NotFound":
        return None
    table = pads.dataset(path, filesystem=fs, format="parquet").head(sample_rows, columns=["image"], filter=pc.field("split") == "train")
    if table.num_rows == 0:
        return None
    pixels = np.frombuffer(b"".join(table["image"].to_pylist()), np.uint8).reshape(table.num_rows, shape[0], -1)
    pixels = pixels.transpose(1, 0, 2).reshape(shape[0], -1).astype(np.float32) / 255.0
    return {"mean": pixels.mean(axis=1).round(6).tolist(), "std": np.maximum(pixels.std(axis=1), 1e-3).round(6).tolist()}


def _npz_array_lengths(data: bytes) -> dict[str, int]:
    """First-dimension length of each array in an .npz, from the .npy headers alone."""
    lengths = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read_header(member)[0]
            lengths[name.removesuffix(".npy")] = shape[0] if shape else 0
    return lengths


class _FileReader:
    """Reads files by URI, keeping one filesystem per scheme (created lazily, once per actor)."""

    def __init__(self) -> None:
        self._filesystems: dict[str, Any] = {}

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes; with ``max_bytes``, its size is checked (a stat) before reading, so
        one huge (or sparse) file in an upload folder cannot exhaust a worker's memory."""
        scheme = uri.split("://", 1)[0] if storage.is_remote(uri) else "local"
        if scheme not in self._filesystems:
            self._filesystems[scheme] = storage.resolve(uri)[0]
        path = uri.split("://", 1)[1] if scheme != "local" else uri
        fs = self._filesystems[scheme]
        if max_bytes is not None:
            declared = fs.get_file_info(path).size
            if declared is not None and declared > max_bytes:
                raise BadInput(f"file too large: {declared} bytes > limit {max_bytes}")
        with fs.open_input_stream(path) as stream:
            # Read at most one byte past the limit: a file that grew after the stat is still refused.
            return stream.read() if max_bytes is None else stream.read(max_bytes + 1)


class ImagePreparer:
    """Ray Data actor: decode, convert channels, resize; rejects keep their path and reason."""

    def __init__(self, options: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.options = ImageOptions.model_validate(options)
        self.reader = _FileReader()
        self._npz_cache: tuple[str, Any] | None = None  # consecutive chunks hit the same file
        self.split_fractions = manifest.get("split_fractions", (0.0, 0.0))
        self.salt = medical_labels.patient_salt()
        self.labels_by_uid: tuple[medical_labels.LabelManifest, dict[str, int]] | None = None
        if manifest.get("label_manifest", {}).get("matched_by") == "sop_instance_uid":  # read once per actor
            labels = medical_labels.read_label_manifest(self.options.labels_manifest, self.options.no_finding_label, self.salt)
            self.labels_by_uid = (labels, labels.by_uid())

    def _npz(self, uri: str) -> Any:
        if self._npz_cache is None or self._npz_cache[0] != uri:
            self._npz_cache = (uri, np.load(io.BytesIO(self.reader.read(uri)), allow_pickle=False))
        return self._npz_cache[1]

    def _rows(self, batch: dict[str, np.ndarray]):
        o = self.options
        for position, (kind, uri, label, split, start, stop) in enumerate(
            zip(batch["kind"], batch["uri"], batch["label"], batch["split"], batch["start"], batch["stop"], strict=True)
        ):
            if kind == "npz":
                arrays = self._npz(uri)
                images, labels = arrays[f"{split}_images"][start:stop], arrays[f"{split}_labels"][start:stop]
                for offset, (image, row_label) in enumerate(zip(images, labels.reshape(len(labels), -1)[:, 0], strict=True)):
                    path = f"{uri}#{split}/{start + offset}"
                    try:
                        yield (
                            path,
                            int(row_label),
                            split,
                            _to_chw(Image.fromarray(np.asarray(image, np.uint8)), o.image_size, o.channels),
                            None,
                        )
                    except (TypeError, ValueError) as exc:
                        yield path, int(row_label), split, None, f"bad array image: {exc}"
                continue
            yield self._file_row(str(uri), int(label), str(split), batch, position)

    def _file_row(self, uri: str, label: int, split: str, batch: dict[str, np.ndarray], i: int) -> tuple:
        """One file -> (key, label, split, chw, reason, patient, study). The key is the
        SOPInstanceUID for DICOM, else the path (or its salted hash); patient and study are
        pseudonyms from the labels manifest or, failing that, the DICOM header."""
        o = self.options
        patient = str(batch["patient"][i]) if "patient" in batch and batch["patient"][i] else None
        study = str(batch["study"][i]) if "study" in batch and batch["study"][i] else None
        path_key = medical_labels.row_key(uri, None, o.hash_paths, self.salt)
        reject = str(batch["reject"][i]) if "reject" in batch and batch["reject"][i] else None
        if reject or (label < 0 and label != medical_labels.LABEL_BY_UID):
            return path_key, -1, split, None, reject or "file is not inside a class folder", patient, study
        try:
            chw, info = decode_file(self.reader.read(uri, o.max_file_bytes), o, uri)
        except BadInput as exc:
            return path_key, label, split, None, str(exc), patient, study
        except OSError as exc:  # unreadable file (permissions, vanished): still a reject, not a crash
            return path_key, label, split, None, read_failure(exc), patient, study
        key = medical_labels.row_key(uri, info.sop_instance_uid if info else None, o.hash_paths, self.salt)
        if label == medical_labels.LABEL_BY_UID:
            labels, by_uid = self.labels_by_uid
            row = by_uid.get(info.sop_instance_uid) if info and info.sop_instance_uid else None
            if row is None or labels.labels[row] < 0:
                reason = medical_labels.NO_MANIFEST_ROW if row is None else "labels manifest row has no label"
                return key, -1, split, None, reason, patient, study
            label, patient, study = labels.labels[row], labels.patients[row], labels.studies[row]
        if info is not None:
            patient = patient or (medical_labels.pseudonym(info.patient_id, self.salt) if info.patient_id else None)
            study = study or (medical_labels.pseudonym(info.study_uid, self.salt, "s") if info.study_uid else None)
        if patient and o.split_by == "patient":
            split = medical_labels.patient_split(patient, *self.split_fractions)
        return key, label, split, chw, None, patient, study

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
        for path, label, split, chw, reason, *ids in self._rows(batch):
            patient, study = ids or (None, None)  # .npz rows carry no patient
            columns["patient"].append(patient)
            columns["study"].append(study)
            columns["path"].append(path)
            columns["label"].append(label)
            columns["split"].append(split)
            columns["image"].append(None if chw is None else chw.tobytes())
            columns["status"].append(STATUS_OK if reason is None else STATUS_REJECTED)
            columns["reject_reason"].append(reason)
        return pa.table(columns, schema=PREPARED_SCHEMA)


class ImageWorkload(Workload):
    name: ClassVar[str] = "image"
    Options: ClassVar[type[BaseModel]] = ImageOptions
    # What the model sees is fixed at prepare. Decode limits may change per run at prepare and batch
    # predict; serve decodes with the model's recorded limits (its body limit is --max-body-bytes).
    option_stages: ClassVar[dict[str, frozenset[str]]] = {
        "image_size": DATA,
        "channels": DATA,
        "class_names": DATA,
        "width": MODEL,
        "max_file_bytes": frozenset({"prepare", "predict"}),
        "max_pixels": frozenset({"prepare", "predict"}),
        "window": DATA,  # the windowing a model was trained on is the one predict and serve apply
        "labels_manifest": DATA,
        "no_finding_label": DATA,
        "split_by": DATA,
        "hash_paths": frozenset({"prepare", "predict"}),
        "threshold_rule": frozenset({"evaluate"}),  # chosen thresholds are registered with the version from there
    }
    training_columns: ClassVar[list[str]] = ["image", "label"]
    id_column: ClassVar[str] = "path"
    group_column: ClassVar[str | None] = "patient"

    def read_prepare_inputs(
        self, input_uri: str, options: ImageOptions, val_fraction: float, test_fraction: float, rows_per_block: int = 256
    ) -> PrepareInputs:
        input_uri = storage.normalize(input_uri)
        if input_uri.endswith(".npz"):
            return self._list_npz(input_uri, options, rows_per_block)
        root = storage.resolve(input_uri)[1].rstrip("/")
        files = storage.list_files(input_uri)
        # Class folders list class by class: write the rows in a stable hash order instead.
        files = [files[i] for i in stable_order([f.path[len(root) + 1 :] for f in files])]
        relative = [f.path[len(root) + 1 :] for f in files]
        uris = [file_uri(input_uri, f.path) for f in files]
        if options.labels_manifest:
            return self._list_with_label_manifest(uris, relative, options, val_fraction, test_fraction, rows_per_block)
        classes = sorted({rel.split("/", 1)[0] for rel in relative if "/" in rel})
        class_index = {name: i for i, name in enumerate(classes)}
        items = {
            "kind": ["file"] * len(files),
            "uri": uris,
            "label": [class_index.get(rel.split("/", 1)[0], -1) if "/" in rel else -1 for rel in relative],
            "split": [assign_split(rel, val_fraction, test_fraction) for rel in relative],
            "start": [0] * len(files),
            "stop": [0] * len(files),
        }
        return PrepareInputs(
            arrow_blocks(pa.table(items), rows_per_block),
            rows_in=len(files),
            manifest={**self._manifest(classes, options), **self._patient_facts(val_fraction, test_fraction)},
            batch_size=rows_per_block,
        )

    def _list_npz(self, uri: str, options: ImageOptions, rows_per_block: int) -> PrepareInputs:
        # Only the (small) label arrays and the images' headers are read here; actors read images.
        data = storage.read_bytes(uri)
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        image_counts = _npz_array_lengths(data)
        items: dict[str, list] = {k: [] for k in ("kind", "uri", "label", "split", "start", "stop")}
        rows_in, max_label = 0, -1
        for split in NPZ_SPLITS:
            key = f"{split}_labels"
            if key not in arrays.files:
                continue
            labels = arrays[key]
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise ValueError(f"{uri}: multi-label arrays ({key} shape {labels.shape}) are not supported")
            if image_counts.get(f"{split}_images") != len(labels):
                raise ValueError(f"{uri}: {split}_images has {image_counts.get(f'{split}_images')} rows but {key} has {len(labels)}")
            rows_in += len(labels)
            max_label = max(max_label, int(labels.max()) if len(labels) else -1)
            for start in range(0, len(labels), rows_per_block):
                for column, value in zip(items, ("npz", uri, -1, split, start, min(start + rows_per_block, len(labels))), strict=True):
                    items[column].append(value)
        if rows_in == 0:
            raise ValueError(f"{uri}: no train_/val_/test_ labels found (MedMNIST layout expected)")
        classes = options.class_names or [str(i) for i in range(max_label + 1)]
        # Each item already stands for a chunk of rows: one item per preparer call.
        return PrepareInputs(arrow_blocks(pa.table(items), 1), rows_in=rows_in, manifest=self._manifest(classes, options), batch_size=1)

    @staticmethod
    def _patient_facts(val_fraction: float, test_fraction: float) -> dict[str, Any]:
        """What the actors need to split by patient, and a salt fingerprint (never the salt)."""
        salt = medical_labels.patient_salt()
        return {
            "split_fractions": [val_fraction, test_fraction],
            "patient_salt": {"fingerprint": medical_labels.salt_fingerprint(salt), "public": salt == medical_labels.PUBLIC_SALT},
        }

    def _list_with_label_manifest(
        self, uris: list[str], relative: list[str], options: ImageOptions, val_fraction: float, test_fraction: float, rows_per_block: int
    ) -> PrepareInputs:
        items, report, labels = medical_labels.list_manifest_items(
            options.labels_manifest, uris, relative, options.no_finding_label, options.split_by, val_fraction, test_fraction
        )
        if report.get("rows_missing_file") or report.get("files_without_row"):
            log.warning("labels manifest: %s", report)  # counts only: paths may carry names
        manifest = {
            **self._manifest(labels.classes, options),
            **self._patient_facts(val_fraction, test_fraction),
            "label_manifest": report,
            "task": "multilabel" if labels.multilabel else "multiclass",
        }
        return PrepareInputs(arrow_blocks(pa.table(items), rows_per_block), rows_in=len(uris), manifest=manifest, batch_size=rows_per_block)

    @staticmethod
    def _manifest(classes: list[str], options: ImageOptions) -> dict[str, Any]:
        return {"classes": classes, "shape": [options.channels, options.image_size, options.image_size]}

    preparer_class: ClassVar[type] = ImagePreparer

    def finalize_manifest(self, prepared_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
        stats = pixel_statistics(prepared_uri, manifest["shape"])
        return {**manifest, "pixel_stats": stats} if stats else manifest

    def build_model(self, options: ImageOptions, manifest: dict[str, Any], pretrained: bool = True) -> torch.nn.Module:
        from ray_app.workloads.image_model import SmallResNet

        stats = manifest.get("pixel_stats", {})
        self.configure(options, manifest)
        return SmallResNet(
            channels=options.channels,
            num_classes=len(manifest["classes"]),
            width=options.width,
            image_size=options.image_size,
            mean=stats.get("mean", [0.5] * options.channels),
            std=stats.get("std", [0.25] * options.channels),
        )

    def configure(self, options: ImageOptions, manifest: dict[str, Any]) -> None:
        # Each loaded bundle gets its own workload instance (get_workload), so the task and the
        # decision thresholds that came with this model can live here for probabilities/format_response.
        self.multilabel = manifest.get("task") == "multilabel"
        self.thresholds = decision_thresholds(manifest)
        self.classes = manifest["classes"]

    def collate(self, batch: dict[str, np.ndarray], options: ImageOptions, manifest: dict[str, Any]):
        import torch

        shape = manifest["shape"]
        images = np.frombuffer(b"".join(batch["image"]), dtype=np.uint8).reshape(len(batch["image"]), *shape)
        targets = None
        if "label" in batch and manifest.get("task") == "multilabel":  # bit mask -> multi-hot floats for BCE
            bits = (np.asarray(batch["label"], np.int64)[:, None] >> np.arange(len(manifest["classes"]))) & 1
            targets = torch.from_numpy(bits.astype(np.float32))
        elif "label" in batch:
            targets = torch.tensor(batch["label"], dtype=torch.long)
        return torch.from_numpy(images.copy()), targets

    # Multi-label findings (collate gives float multi-hot targets): sigmoid outputs, BCE loss.
    multilabel: bool = False
    thresholds: list[float] | None = None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch

        if targets.is_floating_point():
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        return super().loss(logits, targets)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():  # exact match over all findings
            return ((logits > 0) == (targets > 0.5)).all(dim=1).sum()
        return super().correct(logits, targets)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float()) if self.multilabel else super().probabilities(logits)

    def evaluation_report(self, labels: np.ndarray, probabilities: np.ndarray, classes: list[str], **context: Any):
        groups = context.get("groups")
        if labels.ndim == 2 or (groups is not None and any(groups)):  # findings, or patients known
            from ray_app.plots import confusion_matrix
            from ray_app.workloads.clinical_metrics import clinical_report

            report, figures = clinical_report(labels, probabilities, classes, **context)
            if "confusion_matrix" in report:
                figures["confusion_matrix.png"] = confusion_matrix(report["confusion_matrix"], classes)
            return report, figures
        return super().evaluation_report(labels, probabilities, classes)

    def predicted_sets(self, probabilities: np.ndarray) -> list[list[str]] | None:
        if not self.multilabel:
            return None
        above = probabilities >= np.asarray(self.thresholds)
        return [[self.classes[c] for c in np.flatnonzero(row)] for row in above]

    def uses_validation_scores(self, manifest: dict[str, Any]) -> bool:
        return manifest.get("task") == "multilabel"  # decision thresholds are chosen on validation

    def read_predict_inputs(self, input_uri: str, options: ImageOptions, batch_size: int):
        input_uri = storage.normalize(input_uri)
        return arrow_blocks(pa.table({"path": [file_uri(input_uri, f.path) for f in storage.list_files(input_uri)]}), batch_size)

    def __init__(self) -> None:
        self._reader = _FileReader()  # per workload instance = per predict actor

    def load_predict_batch(self, batch, options: ImageOptions, manifest):
        reader = self._reader
        salt = medical_labels.patient_salt()
        items, ids, reasons = [], [], []
        for path in batch["path"]:
            path = str(path)
            try:
                chw, info = decode_file(reader.read(path, options.max_file_bytes), options, path)
                # Keyed by SOPInstanceUID for DICOM (paths often carry patient names).
                ids.append(medical_labels.row_key(path, info.sop_instance_uid if info else None, options.hash_paths, salt))
                items.append(chw)
                reasons.append(None)
                continue
            except BadInput as exc:
                reasons.append(str(exc))
            except OSError as exc:
                reasons.append(read_failure(exc))
            items.append(None)
            ids.append(medical_labels.row_key(path, None, options.hash_paths, salt))
        return items, ids, reasons

    def decode_item(self, payload: bytes, options: ImageOptions, manifest) -> np.ndarray:
        # PNG, JPEG or DICOM (raw or multipart), windowed with the options the model was trained on.
        return decode_file(payload, options)[0]

    def decode_request(
        self, payload: bytes, options: ImageOptions, manifest, max_items: int | None = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        return [(self.decode_item(payload, options, manifest), {})]

    def format_response(self, probabilities: list[np.ndarray], extras, classes: list[str], top_k: int) -> dict[str, Any]:
        if self.multilabel:  # every finding's probability, and the findings at or above their threshold
            p, thresholds = probabilities[0], self.thresholds or [0.5] * len(classes)
            return {
                "probabilities": {name: round(float(p[i]), 6) for i, name in enumerate(classes)},
                "findings": [name for i, name in enumerate(classes) if p[i] >= thresholds[i]],
                "thresholds": dict(zip(classes, thresholds, strict=True)),
            }
        order = np.argsort(-probabilities[0])[:top_k]
        return {"predictions": [{"label": classes[i], "probability": round(float(probabilities[0][i]), 6)} for i in order]}

    def stack_items(self, items: list[np.ndarray], options, manifest) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.stack(items))

    onnx_input_names: ClassVar[list[str]] = ["images"]

    def stack_arrays(self, items: list[np.ndarray], options, manifest) -> dict[str, np.ndarray]:
        return {"images": np.stack(items)}
