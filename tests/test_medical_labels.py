"""Label manifests, patient pseudonyms and patient-level splits; no Ray."""

from __future__ import annotations

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_app.workloads import medical_labels as ml


def test_chestxray14_style_columns_are_found():
    found = ml.find_columns(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age"])
    assert found == {"path": "Image Index", "label": "Finding Labels", "patient": "Patient ID"}
    assert ml.find_columns(["SOPInstanceUID", "labels", "PatientID", "StudyInstanceUID"]) == {
        "uid": "SOPInstanceUID",
        "label": "labels",
        "patient": "PatientID",
        "study": "StudyInstanceUID",
    }


def test_multilabel_csv_keeps_ids_as_text_and_no_finding_means_none(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(
        "Image Index,Finding Labels,Patient ID\na.dcm,Effusion|Nodule,000123\nb.dcm,No Finding,123\nc.dcm,Opacity,000123\nd.dcm,,77\n"
    )
    labels = ml.read_label_manifest(str(path), "No Finding", "salt")
    assert labels.multilabel and labels.classes == ["Effusion", "Nodule", "Opacity"]
    assert labels.labels == [0b011, 0, 0b100, 0]
    # "000123" and "123" are different patients: ids are never parsed as numbers.
    assert labels.patients[0] == labels.patients[2] != labels.patients[1]
    assert all(p.startswith("p-") and "123" not in p for p in labels.patients)


def test_single_label_parquet_by_sop_instance_uid(tmp_path):
    path = str(tmp_path / "labels.parquet")
    pq.write_table(pa.table({"SOPInstanceUID": ["1.2.3", "1.2.4", "1.2.5"], "label": ["normal", "pneumonia", None]}), path)
    labels = ml.read_label_manifest(path, "No Finding", "salt")
    assert not labels.multilabel and labels.classes == ["normal", "pneumonia"]
    assert labels.labels == [0, 1, -1] and labels.rows_unlabelled == 1
    assert labels.by_uid() == {"1.2.3": 0, "1.2.4": 1, "1.2.5": 2}


def test_manifest_without_label_or_image_column_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("path,patient\nx.dcm,1\n")
    with pytest.raises(ValueError, match="no label column"):
        ml.read_label_manifest(str(path), "No Finding", "s")
    path.write_text("label,patient\nx,1\n")
    with pytest.raises(ValueError, match="no image column"):
        ml.read_label_manifest(str(path), "No Finding", "s")


def test_files_and_manifest_rows_are_matched_and_the_gaps_counted(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,label\nstudy1/a.dcm,x\nb.dcm,y\nmissing.dcm,x\nsub/dup.dcm,x\nother/dup.dcm,y\n")
    labels = ml.read_label_manifest(str(path), "No Finding", "s")
    matched, rows_missing = ml.match_paths(labels, ["study1/a.dcm", "deep/b.dcm", "stray.dcm", "x/dup.dcm"])
    # by relative path, by unique file name, no row, ambiguous name -> no row
    assert matched == [0, 1, None, None]
    assert rows_missing == 3  # missing.dcm and both dup.dcm rows


def test_pseudonyms_are_keyed_by_the_salt():
    assert ml.pseudonym("PAT1", "a") == ml.pseudonym(" PAT1 ", "a")
    assert ml.pseudonym("PAT1", "a") != ml.pseudonym("PAT1", "b")
    assert "PAT1" not in ml.pseudonym("PAT1", "a")


def test_no_patient_spans_two_splits_and_splits_are_stable_when_patients_are_added():
    salt = "test-salt"
    images = [(f"PAT{p:04d}", f"img{p}_{i}") for p in range(400) for i in range(1 + p % 7)]
    splits = collections.defaultdict(set)
    for patient, _ in images:
        splits[patient].add(ml.patient_split(ml.pseudonym(patient, salt), 0.15, 0.15))
    assert all(len(s) == 1 for s in splits.values())
    counts = collections.Counter(next(iter(s)) for s in splits.values())
    assert 0.08 < counts["test"] / 400 < 0.22 and 0.08 < counts["val"] / 400 < 0.22
    before = {p: next(iter(s)) for p, s in splits.items()}
    # 200 new patients later, every earlier patient keeps its split.
    for p in range(400, 600):
        ml.patient_split(ml.pseudonym(f"PAT{p:04d}", salt), 0.15, 0.15)
    assert all(ml.patient_split(ml.pseudonym(p, salt), 0.15, 0.15) == split for p, split in before.items())


def test_rows_are_keyed_by_uid_or_hashed_path():
    assert ml.row_key("/data/Doe_Jane/1.dcm", "1.2.3", True, "s") == "1.2.3"
    assert ml.row_key("/data/Doe_Jane/1.dcm", None, False, "s") == "/data/Doe_Jane/1.dcm"
    hashed = ml.row_key("/data/Doe_Jane/1.dcm", None, True, "s")
    assert hashed.startswith("f-") and "Doe" not in hashed
