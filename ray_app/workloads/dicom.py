"""DICOM decoding for the image workload: pydicom reads the file, this module turns its pixels into
the same uint8 C×H×W array a PNG gives, with the radiology steps in between done the standard way.

What happens to a file, in order:

1. **Parse** with pydicom, reading *only* the tags listed in ``READ_TAGS``. Everything else —
   PatientName, PatientBirthDate, addresses, accession numbers, free-text comments — is skipped
   by the parser, never held in memory, so it cannot leak into logs, rejects, predictions or model
   metadata. Files with the ``DICM`` preamble are read normally; files without one (old
   "raw" DICOM, no File Meta header) are read with ``force=True`` and their encoding inferred.
2. **Refuse** what is not a single image we can decode, with a reason: non-image SOP classes
   (RT Plan, RT Dose, SR, Segmentation, waveforms, ...), files with no pixel data, transfer
   syntaxes no installed decoder handles (the reason names the syntax), oversized frames.
   Compressed syntaxes decode through pydicom's own RLE decoder and the pylibjpeg plugins
   (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K).
3. **Multi-frame** files (NumberOfFrames > 1) give one row: the *middle* frame (decoded alone,
   not the whole stack). One row per file keeps labels, keys and patient counts per file; for a
   CT series stored as one enhanced multi-frame object the middle slice is the usual key image.
4. **Modality LUT**: Rescale Slope/Intercept (CT → Hounsfield units) in float32, or the Modality
   LUT Sequence where one is present. Stored values stay at full 12/16-bit precision until here.
5. **Window** (VOI): a linear window ``[C - W/2, C + W/2] → [0, 1]``, clipped — the same mapping as
   MONAI's ``ScaleIntensityRanged(a_min=C-W/2, a_max=C+W/2, b_min=0, b_max=1, clip=True)``.
   The window comes from ``ImageOptions.window``: ``file`` (the file's first Window Center/Width;
   per-image min–max when it has none), ``minmax``, a named preset (``WINDOW_PRESETS``) or two
   numbers ``C W``. The option is part of the prepared manifest and the model bundle, so batch
   predict and the endpoint window exactly as training did.
6. **MONOCHROME1** is inverted after windowing (bright = dense, like MONOCHROME2). Colour images
   (RGB, YBR → RGB by pydicom, PALETTE COLOR through its LUT) skip windowing and are scaled by
   their bit depth.
7. Resize (bilinear, in float, before quantising) and quantise to uint8.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

# The only tags parsed. Identity: SOPInstanceUID keys predictions; PatientID and StudyInstanceUID
# are read only to be salted and hashed (patient-level splits, per-patient bootstrap) and are
# never written out in clear. SOPClassUID decides image or not. The rest is the Image Pixel,
# Modality LUT, VOI LUT and palette modules that decoding needs.
IDENTITY_TAGS = ("SOPClassUID", "SOPInstanceUID", "PatientID", "StudyInstanceUID")
PIXEL_TAGS = (
    "SpecificCharacterSet",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
)
READ_TAGS = IDENTITY_TAGS + PIXEL_TAGS

# Radiology's usual CT windows (centre, width) in Hounsfield units (Radiopaedia, "Windowing (CT)").
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "abdomen": (50.0, 400.0),
}
WINDOW_MODES = ("file", "minmax")
MAX_FRAME_PIXELS = 40_000_000  # the image workload's default pixel cap; frames above it are refused before decoding
PREAMBLE_OFFSET = 128


class DicomRejected(ValueError):
    """A DICOM file we cannot use; the message is the reject reason (never carries tag values)."""


@dataclass
class DicomImage:
    chw: np.ndarray  # uint8 C×H×W
    sop_instance_uid: str | None
    patient_id: str | None  # in clear, only in memory: callers salt and hash it before it goes anywhere
    study_uid: str | None
    frames: int


def parse_window(spec: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Validate a window option: ``["file"]``, ``["minmax"]``, ``["lung"]`` (a preset) or ``["C", "W"]``."""
    if spec is None:
        return ["file"]
    values = [spec] if isinstance(spec, str) else [str(v) for v in spec]
    if len(values) == 1 and (values[0] in WINDOW_MODES or values[0] in WINDOW_PRESETS):
        return values
    if len(values) == 2:
        try:
            centre, width = float(values[0]), float(values[1])
        except ValueError:
            pass
        else:
            if width <= 0:
                raise ValueError(f"window width must be > 0, got {width}")
            return [repr(centre), repr(width)]
    raise ValueError(f"window must be 'file', 'minmax', a preset ({', '.join(WINDOW_PRESETS)}) or two numbers 'C W'; got {values}")


def has_preamble(data: bytes) -> bool:
    return data[PREAMBLE_OFFSET : PREAMBLE_OFFSET + 4] == b"DICM"


def looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM data set without preamble or File Meta starts with a group-0008 element (little or
    big endian): cheap enough to test before a forced parse of an arbitrary file."""
    return data[:2] in (b"\x08\x00", b"\x00\x08") and len(data) > 8


def _read(data: bytes) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    forced = not has_preamble(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(READ_TAGS), force=forced)
    except InvalidDicomError as exc:
        raise DicomRejected(f"not a readable DICOM file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DicomRejected(f"corrupt DICOM file: {type(exc).__name__}") from None
    if len(ds) == 0:  # nothing among READ_TAGS: a DICOM object, but no image in it
        raise DicomRejected("DICOM file has no pixel data (no image tags)" if not forced else "not a readable DICOM file: no data elements")
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    if meta is None or "TransferSyntaxUID" not in meta:
        # No File Meta (or no syntax in it): the parser already found the encoding.
        import pydicom.dataset

        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


# A study set holds a handful of SOP classes and transfer syntaxes: what each one means is looked
# up once per process (pydicom's UID names and decoder registry cost more than decoding a small frame).
@functools.lru_cache(maxsize=256)
def _non_image_sop_class(uid: str) -> str | None:
    """The SOP class's name when it is not an image storage class, else None."""
    from pydicom.uid import UID

    sop_class = UID(uid)
    name = sop_class.name
    # Every image storage class has "Image Storage" in its name (CT, MR, CR, DX, MG, US, SC, the
    # enhanced and multi-frame variants); RT Dose and Segmentation carry pixels but are not images.
    if name and sop_class.is_valid and "Image Storage" not in name and name != uid:
        return name
    return None


@functools.lru_cache(maxsize=64)
def _undecodable_syntax(uid: str) -> str | None:
    """Why pixel data in this transfer syntax cannot be decoded here, or None when it can."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    syntax = UID(uid)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax: {syntax.name} ({syntax})"
    if not decoder.is_available:
        return f"no installed decoder for transfer syntax {syntax.name} ({syntax}): pip install pylibjpeg-libjpeg pylibjpeg-openjpeg"
    return None


def _check_decodable(ds: Any, max_pixels: int) -> None:
    sop_class = ds.get("SOPClassUID")
    non_image = _non_image_sop_class(str(sop_class)) if sop_class else None
    if non_image:
        raise DicomRejected(f"non-image SOP class: {non_image}")
    if "PixelData" not in ds:
        raise DicomRejected(f"DICOM file has no pixel data (SOP class {sop_class.name if sop_class else 'unknown'})")
    undecodable = _undecodable_syntax(str(ds.file_meta.TransferSyntaxUID))
    if undecodable:
        raise DicomRejected(undecodable)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or columns <= 0:
        raise DicomRejected("DICOM image has no Rows/Columns")
    if rows * columns > max_pixels:
        raise DicomRejected(f"image too large: {columns}x{rows} = {rows * columns} pixels > limit {max_pixels}")


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued (several windows offered): the first is the default."""
    if value is None:
        raise TypeError
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window_bounds(pixels: np.ndarray, ds: Any, window: list[str]) -> tuple[float, float]:
    """(low, high) of the linear window in modality units (HU for CT)."""
    mode = window[0]
    if len(window) == 2:
        centre, width = float(window[0]), float(window[1])
    elif mode in WINDOW_PRESETS:
        centre, width = WINDOW_PRESETS[mode]
    else:
        centre = width = None
        if mode == "file":
            try:
                centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
            except (TypeError, ValueError):
                centre = width = None
        if centre is None or width is None or width <= 0:
            low, high = float(pixels.min()), float(pixels.max())
            return low, high if high > low else low + 1.0
    return centre - width / 2, centre + width / 2


def _modality_lut(pixels: np.ndarray, ds: Any) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(pixels, ds).astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    out = pixels.astype(np.float32)  # a new array: the in-place steps below never touch the decoded one
    if slope is not None and float(slope) != 1.0:
        out *= np.float32(float(slope))
    if intercept is not None and float(intercept) != 0.0:
        out += np.float32(float(intercept))
    return out


def _window_to_unit(values: np.ndarray, low: float, high: float, invert: bool) -> np.ndarray:
    """Modality values -> [0, 1] through the window, in place on ``values`` (float32, owned here):
    one pass per step and no temporaries, which at 224×224 is most of the arithmetic's cost."""
    values -= np.float32(low)
    values *= np.float32(1.0 / (high - low))
    np.clip(values, 0.0, 1.0, out=values)
    if invert:  # MONOCHROME1: 1 - x
        np.subtract(np.float32(1.0), values, out=values)
    return values


def _to_unit_colour(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Colour pixels -> float32 H×W×3 in [0, 1], scaled by the stored bit depth."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        bits = 16 if pixels.dtype == np.uint16 else 8
    else:
        bits = int(ds.get("BitsStored") or pixels.dtype.itemsize * 8)
    return np.clip(pixels.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def _resize_unit(unit: np.ndarray, size: int) -> np.ndarray:
    """Float H×W in [0, 1] -> uint8 size×size, resized before quantising (no double rounding)."""
    from PIL import Image

    if unit.shape != (size, size):
        unit = np.asarray(
            Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
        )
    scaled = unit * np.float32(255.0)  # float32 throughout (a float64 detour doubles the memory traffic)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def decode_dicom(data: bytes, size: int, channels: int, window: list[str], max_pixels: int = MAX_FRAME_PIXELS) -> DicomImage:
    """DICOM bytes -> DicomImage (uint8 C×H×W + keys). Raises DicomRejected with a reason.
    ``max_pixels`` caps one frame's Rows×Columns, checked before any pixel is decoded (only the
    chosen frame of a multi-frame file is decoded)."""
    ds = _read(data)
    _check_decodable(ds, max_pixels)
    frames = int(ds.get("NumberOfFrames") or 1) if str(ds.get("NumberOfFrames") or "1").strip().isdigit() else 1
    try:
        # pydicom's own pixel_array function, not the Dataset property: the same decoders and
        # validation, without the property's change tracking (two walks over the pixel module per call).
        from pydicom.pixels import pixel_array

        pixels = pixel_array(ds, index=frames // 2 if frames > 1 else None)  # multi-frame: the middle frame only
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt pixel data
        # The first line only: plugin errors list every plugin tried, several lines long.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DicomRejected(
            f"cannot decode DICOM pixel data ({ds.file_meta.TransferSyntaxUID.name}): {type(exc).__name__}: {detail}"
        ) from None
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples == 1 and photometric != "PALETTE COLOR":
        if pixels.ndim != 2:
            raise DicomRejected(f"unexpected pixel array shape {pixels.shape} for a single frame")
        values = _modality_lut(pixels, ds)
        low, high = window_bounds(values, ds, window)
        grey = _resize_unit(_window_to_unit(values, low, high, photometric == "MONOCHROME1"), size)
        chw = grey[None] if channels == 1 else np.repeat(grey[None], 3, axis=0)
    else:
        rgb = _to_unit_colour(pixels, ds)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise DicomRejected(f"unexpected colour pixel array shape {rgb.shape}")
        if channels == 1:  # ITU-R 601 luma, the same weights Pillow's convert("L") uses
            chw = _resize_unit(rgb @ np.array([0.299, 0.587, 0.114], np.float32), size)[None]
        else:
            chw = np.stack([_resize_unit(rgb[..., c], size) for c in range(3)])
    return DicomImage(
        chw=chw,
        sop_instance_uid=str(ds.SOPInstanceUID) if ds.get("SOPInstanceUID") else None,
        patient_id=str(ds.PatientID).strip() or None if ds.get("PatientID") else None,
        study_uid=str(ds.StudyInstanceUID) if ds.get("StudyInstanceUID") else None,
        frames=frames,
    )
