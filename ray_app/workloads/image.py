"""Image classification (e.g. medical scans): class-per-folder PNG/JPEG files or MedMNIST ``.npz``,
decoded with Pillow; the model lives in ``image_model.py``. torch is imported lazily here so the
Ray Data decode actors start without paying for it.
"""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from ray_app import storage
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


def _to_chw(img: Image.Image, size: int, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_image(data: bytes, size: int, channels: int, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 C×H×W. Raises BadInput with a reason a person can act on.

    Only the header is parsed before the limits are checked: an image over ``max_pixels`` or in a
    format outside ``PIL_FORMATS`` is refused without decoding a single pixel."""
    if not data:
        raise BadInput("empty file")
    if len(data) > max_bytes:
        raise BadInput(f"file too large: {len(data)} bytes > limit {max_bytes}")
    # Medical hook: DICOM (b"DICM" at byte 128) is dispatched here, before Pillow, to a pydicom
    # decoder that applies the same ``max_pixels`` check to Rows x Columns x frames.
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
        raise BadInput(f"not an image in an accepted format ({', '.join(PIL_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"corrupt or truncated image: {exc}") from None


def file_uri(input_uri: str, fs_path: str) -> str:
    """Re-attach the scheme that pyarrow strips from remote paths."""
    return f"{input_uri.split('://', 1)[0]}://{fs_path}" if storage.is_remote(input_uri) else fs_path


def pixel_statistics(prepared_uri: str, shape: list[int], sample_rows: int = 4096) -> dict[str, list[float]] | None:
    """Per-channel mean/std from a sample of training rows (read back from Parquet once, rather
    than computed per row in the decode hot path)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.resolve(storage.join(prepared_uri, f"status={STATUS_OK}"))
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

    def _npz(self, uri: str) -> Any:
        if self._npz_cache is None or self._npz_cache[0] != uri:
            self._npz_cache = (uri, np.load(io.BytesIO(self.reader.read(uri)), allow_pickle=False))
        return self._npz_cache[1]

    def _rows(self, batch: dict[str, np.ndarray]):
        o = self.options
        for kind, uri, label, split, start, stop in zip(
            batch["kind"], batch["uri"], batch["label"], batch["split"], batch["start"], batch["stop"], strict=True
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
            if label < 0:
                yield uri, -1, split, None, "file is not inside a class folder"
                continue
            try:
                data = self.reader.read(uri, o.max_file_bytes)
                yield uri, int(label), split, decode_image(data, o.image_size, o.channels, o.max_file_bytes, o.max_pixels), None
            except BadInput as exc:
                yield uri, int(label), split, None, str(exc)
            except OSError as exc:  # unreadable file (permissions, vanished): still a reject, not a crash
                yield uri, int(label), split, None, f"cannot read file: {exc}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
        for path, label, split, chw, reason in self._rows(batch):
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
    }
    training_columns: ClassVar[list[str]] = ["image", "label"]
    id_column: ClassVar[str] = "path"

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
        classes = sorted({rel.split("/", 1)[0] for rel in relative if "/" in rel})
        class_index = {name: i for i, name in enumerate(classes)}
        items = {
            "kind": ["file"] * len(files),
            "uri": [file_uri(input_uri, f.path) for f in files],
            "label": [class_index.get(rel.split("/", 1)[0], -1) if "/" in rel else -1 for rel in relative],
            "split": [assign_split(rel, val_fraction, test_fraction) for rel in relative],
            "start": [0] * len(files),
            "stop": [0] * len(files),
        }
        return PrepareInputs(
            arrow_blocks(pa.table(items), rows_per_block),
            rows_in=len(files),
            manifest=self._manifest(classes, options),
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
    def _manifest(classes: list[str], options: ImageOptions) -> dict[str, Any]:
        return {"classes": classes, "shape": [options.channels, options.image_size, options.image_size]}

    preparer_class: ClassVar[type] = ImagePreparer

    def finalize_manifest(self, prepared_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
        stats = pixel_statistics(prepared_uri, manifest["shape"])
        return {**manifest, "pixel_stats": stats} if stats else manifest

    def build_model(self, options: ImageOptions, manifest: dict[str, Any], pretrained: bool = True) -> torch.nn.Module:
        from ray_app.workloads.image_model import SmallResNet

        stats = manifest.get("pixel_stats", {})
        return SmallResNet(
            channels=options.channels,
            num_classes=len(manifest["classes"]),
            width=options.width,
            image_size=options.image_size,
            mean=stats.get("mean", [0.5] * options.channels),
            std=stats.get("std", [0.25] * options.channels),
        )

    def collate(self, batch: dict[str, np.ndarray], options: ImageOptions, manifest: dict[str, Any]):
        import torch

        shape = manifest["shape"]
        images = np.frombuffer(b"".join(batch["image"]), dtype=np.uint8).reshape(len(batch["image"]), *shape)
        targets = torch.tensor(batch["label"], dtype=torch.long) if "label" in batch else None
        return torch.from_numpy(images.copy()), targets

    def read_predict_inputs(self, input_uri: str, options: ImageOptions, batch_size: int):
        input_uri = storage.normalize(input_uri)
        return arrow_blocks(pa.table({"path": [file_uri(input_uri, f.path) for f in storage.list_files(input_uri)]}), batch_size)

    def __init__(self) -> None:
        self._reader = _FileReader()  # per workload instance = per predict actor

    def load_predict_batch(self, batch, options: ImageOptions, manifest):
        reader = self._reader
        items, ids, reasons = [], [], []
        for path in batch["path"]:
            ids.append(path)
            try:
                items.append(self.decode_item(reader.read(path, options.max_file_bytes), options, manifest))
                reasons.append(None)
            except BadInput as exc:
                items.append(None)
                reasons.append(str(exc))
            except OSError as exc:
                items.append(None)
                reasons.append(f"cannot read file: {exc}")
        return items, ids, reasons

    def decode_item(self, payload: bytes, options: ImageOptions, manifest) -> np.ndarray:
        return decode_image(payload, options.image_size, options.channels, options.max_file_bytes, options.max_pixels)

    def decode_request(
        self, payload: bytes, options: ImageOptions, manifest, max_items: int | None = None
    ) -> list[tuple[Any, dict[str, Any]]]:
        return [(self.decode_item(payload, options, manifest), {})]

    def format_response(self, probabilities: list[np.ndarray], extras, classes: list[str], top_k: int) -> dict[str, Any]:
        order = np.argsort(-probabilities[0])[:top_k]
        return {"predictions": [{"label": classes[i], "probability": round(float(probabilities[0][i]), 6)} for i in order]}

    def stack_items(self, items: list[np.ndarray], options, manifest) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.stack(items))
