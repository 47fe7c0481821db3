"""Labels and patients for medical images: a label manifest exported from a PACS/RIS (CSV or
Parquet), pseudonymous patient ids, and patient-level splits.

Manifest columns are found by name (case, spaces and underscores ignored):

- the image: ``path`` / ``file`` / ``filename`` / ``image`` / ``Image Index`` (relative to
  ``--input``, or a bare file name when unique), and/or ``SOPInstanceUID``;
- the label: ``label`` / ``labels`` / ``finding(s)`` / ``Finding Labels``: one label, or several
  separated by ``|`` (ChestX-ray14 style) or a Parquet list. Several findings in any row make the
  task multi-label; then ``No Finding`` (``--no-finding-label``) means none of them;
- optional ``PatientID`` / ``patient_id`` / ``patient`` and ``StudyInstanceUID`` / ``study_id``.

Patients never appear in clear: ``pseudonym`` is a keyed BLAKE2b of the id with a salt taken from
``RAY_APP_PATIENT_SALT`` (set the same value wherever prepare runs — on a cluster through the job's
``runtime_env`` — and keep it secret; without it a fixed public salt is used and the summary says
so). The split is a hash of that pseudonym, so every image of a patient lands in one split, and
adding patients never moves an existing one.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ray_app import storage
from ray_app.workloads.base import assign_split

SALT_ENV = "RAY_APP_PATIENT_SALT"
PUBLIC_SALT = "ray-app-public-salt"
LABEL_SEPARATORS = re.compile(r"[|;]")
MAX_FINDINGS = 62  # findings are stored as a bit mask in the prepared int64 label column

COLUMN_NAMES = {
    "path": ("path", "file", "filename", "filepath", "image", "imageindex", "imagepath"),
    "uid": ("sopinstanceuid",),
    "label": ("label", "labels", "finding", "findings", "findinglabels", "class"),
    "patient": ("patientid", "patient"),
    "study": ("studyinstanceuid", "studyid", "study"),
}


def patient_salt() -> str:
    return os.environ.get(SALT_ENV) or PUBLIC_SALT


def salt_fingerprint(salt: str) -> str:
    """Recorded in the manifest: shows whether two prepares used the same salt, without the salt."""
    return hashlib.sha256(f"fingerprint:{salt}".encode()).hexdigest()[:12]


def pseudonym(value: str, salt: str, prefix: str = "p") -> str:
    """A keyed hash (BLAKE2b with the salt as key): stable for one salt, unlinkable without it."""
    digest = hashlib.blake2b(value.strip().encode(), key=salt.encode()[:64], digest_size=10).hexdigest()
    return f"{prefix}-{digest}"


def patient_split(patient: str, val_fraction: float, test_fraction: float) -> str:
    """All rows of one (pseudonymous) patient get one split; it depends on that patient alone."""
    return assign_split(f"patient:{patient}", val_fraction, test_fraction)


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_columns(names: list[str]) -> dict[str, str]:
    """Role -> the manifest's column name, for the roles present."""
    by_normal = {_normal(n): n for n in names}
    found = {}
    for role, candidates in COLUMN_NAMES.items():
        for candidate in candidates:
            if candidate in by_normal:
                found[role] = by_normal[candidate]
                break
    return found


def split_findings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    return [part.strip() for part in LABEL_SEPARATORS.split(str(value)) if part.strip()]


@dataclass
class LabelManifest:
    """A parsed label manifest: per row the image key(s), label bits, patient/study pseudonyms."""

    classes: list[str]
    multilabel: bool
    paths: list[str | None]
    uids: list[str | None]
    labels: list[int]  # class index, or a bit mask of findings when multilabel
    patients: list[str | None]
    studies: list[str | None]
    rows_unlabelled: int = 0
    columns: dict[str, str] = field(default_factory=dict)

    def by_uid(self) -> dict[str, int]:
        return {uid: i for i, uid in enumerate(self.uids) if uid}


def _read_table(uri: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    uri = storage.normalize(uri)
    fs, path = storage.resolve(uri)
    if uri.endswith(".parquet"):
        return pq.read_table(path, filesystem=fs)
    # Ids must stay strings (PatientID "000123" is not the number 123): the header first, then
    # every column read as text.
    with fs.open_input_stream(path) as stream:
        names = pacsv.open_csv(stream).schema.names
    with fs.open_input_stream(path) as stream:
        options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True)
        return pacsv.read_csv(stream, convert_options=options)


def read_label_manifest(uri: str, no_finding: str, salt: str) -> LabelManifest:
    table = _read_table(uri)
    columns = find_columns(table.column_names)
    if "label" not in columns:
        raise ValueError(f"{uri}: no label column (expected one of label, labels, findings, Finding Labels); found {table.column_names}")
    if "path" not in columns and "uid" not in columns:
        raise ValueError(f"{uri}: no image column (expected path/file/filename/Image Index or SOPInstanceUID); found {table.column_names}")

    def column(role: str) -> list[Any]:
        return table[columns[role]].to_pylist() if role in columns else [None] * table.num_rows

    raw_labels = [split_findings(v) for v in column("label")]
    multilabel = pa.types.is_list(table[columns["label"]].type) or any(len(v) > 1 for v in raw_labels)
    if multilabel:
        raw_labels = [[f for f in v if f != no_finding] for v in raw_labels]
        classes = sorted({f for v in raw_labels for f in v})
        if len(classes) > MAX_FINDINGS:
            raise ValueError(f"{uri}: {len(classes)} findings; at most {MAX_FINDINGS} are supported")
        index = {name: i for i, name in enumerate(classes)}
        labels = [sum(1 << index[f] for f in set(v)) for v in raw_labels]
        unlabelled = 0
    else:
        classes = sorted({v[0] for v in raw_labels if v})
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[v[0]] if v else -1 for v in raw_labels]
        unlabelled = sum(1 for v in raw_labels if not v)
    return LabelManifest(
        classes=classes,
        multilabel=multilabel,
        paths=[str(p).strip() if p else None for p in column("path")],
        uids=[str(u).strip() if u else None for u in column("uid")],
        labels=labels,
        patients=[pseudonym(str(p), salt) if p is not None and str(p).strip() else None for p in column("patient")],
        studies=[pseudonym(str(s), salt, "s") if s is not None and str(s).strip() else None for s in column("study")],
        rows_unlabelled=unlabelled,
        columns=columns,
    )


def match_paths(manifest: LabelManifest, relative_paths: list[str]) -> tuple[list[int | None], int]:
    """For each listed file, its manifest row (by relative path, else by unique file name), and the
    number of manifest rows (with a path) whose file was not found."""
    by_path = {p.lstrip("./"): i for i, p in enumerate(manifest.paths) if p}
    names: dict[str, int | None] = {}
    for i, p in enumerate(manifest.paths):
        if p:
            name = os.path.basename(p)
            names[name] = None if name in names else i  # ambiguous names match nothing
    matched: list[int | None] = []
    for rel in relative_paths:
        row = by_path.get(rel)
        if row is None and os.path.basename(rel) in names:
            row = names[os.path.basename(rel)]
        matched.append(row)
    found = {row for row in matched if row is not None}
    rows_missing = sum(1 for i, p in enumerate(manifest.paths) if p and i not in found)
    return matched, rows_missing


LABEL_BY_UID = -2  # work-item label: look the file up in the manifest by its SOPInstanceUID (in the actor)
NO_MANIFEST_ROW = "no row in the labels manifest for this file"


def row_key(uri: str, sop_instance_uid: str | None, hash_paths: bool, salt: str) -> str:
    """What names a row in prepared data, rejects and predictions: the SOPInstanceUID when the
    file has one; else the path, or (``hash_paths``: paths often carry patient names) its keyed hash."""
    if sop_instance_uid:
        return sop_instance_uid
    return pseudonym(uri, salt, "f") if hash_paths else uri


def list_manifest_items(
    manifest_uri: str,
    uris: list[str],
    relative: list[str],
    no_finding: str,
    split_by: str,
    val_fraction: float,
    test_fraction: float,
) -> tuple[dict[str, list], dict[str, Any], LabelManifest]:
    """Work items for files labelled by a manifest, and what to record about the match (counts
    only: the manifest is a PHI-free place)."""
    salt = patient_salt()
    labels = read_label_manifest(manifest_uri, no_finding, salt)
    n = len(uris)
    items: dict[str, list] = {"kind": ["file"] * n, "uri": uris, "start": [0] * n, "stop": [0] * n, "reject": [""] * n}
    if "path" in labels.columns:
        matched, rows_missing = match_paths(labels, relative)
        items["label"] = [labels.labels[row] if row is not None else -1 for row in matched]
        items["patient"] = [(labels.patients[row] or "") if row is not None else "" for row in matched]
        items["study"] = [(labels.studies[row] or "") if row is not None else "" for row in matched]
        items["reject"] = [
            NO_MANIFEST_ROW if row is None else ("labels manifest row has no label" if labels.labels[row] < 0 else "") for row in matched
        ]
        report = {
            "matched_by": "path",
            "rows": len(labels.labels),
            "rows_missing_file": rows_missing,
            "files_without_row": matched.count(None),
        }
    else:  # SOPInstanceUID only: the actors read each file's UID and look it up
        items["label"] = [LABEL_BY_UID] * n
        items["patient"] = [""] * n
        items["study"] = [""] * n
        report = {"matched_by": "sop_instance_uid", "rows": len(labels.labels)}
    report["rows_unlabelled"] = labels.rows_unlabelled
    items["split"] = [
        patient_split(patient, val_fraction, test_fraction)
        if patient and split_by == "patient"
        else assign_split(rel, val_fraction, test_fraction)
        for patient, rel in zip(items["patient"], relative, strict=True)
    ]
    return items, report, labels
