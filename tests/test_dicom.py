"""DICOM decoding on real pixels (MNIST digits written as DICOM here) and on the real files that
pydicom's wheel ships; no Ray."""

from __future__ import annotations

import io
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import MPEG2MPML, ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from ray_app.demos.data import load_mnist_5k
from ray_app.demos.medical_data import DicomSpec, write_dicom
from ray_app.workloads import dicom
from ray_app.workloads.base import BadInput
from ray_app.workloads.image import ImageOptions, decode_file, decode_image

TEST_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_mnist_5k()[0][:20]


def _roundtrip(tmp_path, pixels: np.ndarray, spec: DicomSpec, window: list[str], size: int = 28, name: str = "x.dcm") -> np.ndarray:
    path = write_dicom(str(tmp_path / name), pixels, spec)
    return dicom.decode_dicom(open(path, "rb").read(), size, 1, window).chw[0]


@pytest.mark.parametrize(
    "spec",
    [
        DicomSpec(bits=8),
        DicomSpec(bits=12, slope=1.0, intercept=-1024.0),
        DicomSpec(bits=16, slope=0.5, intercept=100.0, signed=True),
        DicomSpec(bits=12, photometric="MONOCHROME1", slope=2.0, intercept=-1000.0),
        DicomSpec(bits=16, transfer_syntax=RLELossless),
        DicomSpec(bits=12, transfer_syntax=ImplicitVRLittleEndian, photometric="MONOCHROME1"),
        DicomSpec(bits=16, transfer_syntax=ExplicitVRBigEndian, slope=3.0, intercept=-3000.0),
    ],
    ids=["8bit", "12bit-ct", "16bit-signed", "mono1", "rle", "implicit-mono1", "bigendian"],
)
def test_minmax_window_gives_back_the_digit_whatever_the_storage(tmp_path, digits, spec):
    # Stretching to the bit depth, rescale and MONOCHROME1 inversion must all be undone exactly:
    # the digit's full 0..255 range comes back within one grey level.
    for digit in digits[:3]:
        decoded = _roundtrip(tmp_path, digit, spec, ["minmax"])
        assert np.abs(decoded.astype(int) - digit.astype(int)).max() <= 1


def test_jpeg2000_lossless_decodes_through_pylibjpeg(tmp_path, digits):
    big = np.asarray(Image.fromarray(digits[0]).resize((64, 64), Image.Resampling.NEAREST))
    decoded = _roundtrip(tmp_path, big, DicomSpec(bits=12, transfer_syntax=JPEG2000Lossless), ["minmax"], size=64)
    assert np.abs(decoded.astype(int) - big.astype(int)).max() <= 1


def test_explicit_window_is_applied_in_hounsfield_units(tmp_path, digits):
    spec = DicomSpec(bits=12, slope=1.0, intercept=-1024.0)
    digit = digits[0]
    decoded = _roundtrip(tmp_path, digit, spec, ["-600", "1500"])
    hu = -1024.0 + np.rint(digit / 255.0 * 4095)  # what the file stores, through the rescale
    low, high = -600 - 750, -600 + 750
    expected = np.rint(np.clip((hu - low) / (high - low), 0, 1) * 255)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1
    # The named preset is the same window; the file's own Window Center/Width too.
    assert np.array_equal(_roundtrip(tmp_path, digit, spec, ["lung"]), decoded)
    windowed = DicomSpec(bits=12, slope=1.0, intercept=-1024.0, window=(-600, 1500))
    assert np.array_equal(_roundtrip(tmp_path, digit, windowed, ["file"]), decoded)


def test_sixteen_bit_precision_survives_until_windowing(tmp_path):
    # Two stored values one unit apart out of 65,535: an 8-bit detour would merge them; a narrow
    # window around them must put them at opposite ends.
    pixels = np.zeros((8, 8), np.float64)
    pixels[:, 4:] = 255.0 / 65535.0  # stored 0 and 1 after stretching to 16 bits
    path = write_dicom(str(tmp_path / "p.dcm"), pixels, DicomSpec(bits=16))
    chw = dicom.decode_dicom(open(path, "rb").read(), 8, 1, ["0.5", "1"]).chw[0]
    assert chw[:, :4].max() == 0 and chw[:, 4:].min() == 255


def test_multi_frame_gives_the_middle_frame(tmp_path, digits):
    path = write_dicom(str(tmp_path / "mf.dcm"), digits[:5], DicomSpec(bits=8, frames=5))
    image = dicom.decode_dicom(open(path, "rb").read(), 28, 1, ["minmax"])
    assert image.frames == 5
    assert np.abs(image.chw[0].astype(int) - digits[2].astype(int)).max() <= 1


def test_dicom_is_recognised_without_suffix_and_without_preamble(tmp_path, digits):
    spec = DicomSpec(bits=12, patient_id="PX-7")
    path = write_dicom(str(tmp_path / "no_suffix"), digits[0], spec)
    data = open(path, "rb").read()
    chw, info = decode_file(data, ImageOptions(window=["minmax"]), path)
    assert info is not None and info.patient_id == "PX-7" and chw.shape == (1, 28, 28)
    # A bare data set (no preamble, no File Meta): found by its first group and read with force.
    ds = pydicom.dcmread(io.BytesIO(data))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    assert not dicom.has_preamble(raw)
    assert np.array_equal(decode_image(raw, 28, 1, 1 << 20, window=["minmax"]), chw)


def test_window_option_is_validated():
    assert ImageOptions(window="lung").window == ["lung"]
    assert ImageOptions(window=["40", "400"]).window == ["40.0", "400.0"]
    for bad in (["sideways"], ["40", "-1"], ["a", "b"], ["1", "2", "3"]):
        with pytest.raises(ValueError):
            ImageOptions(window=bad)


def test_unsupported_transfer_syntax_is_rejected_by_name(tmp_path, digits):
    path = write_dicom(str(tmp_path / "m.dcm"), digits[0], DicomSpec(bits=8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # an MPEG-2 video stream: no pixel decoder exists
    ds.PixelData = encapsulate([ds.PixelData])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(BadInput, match=r"unsupported transfer syntax: MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        decode_file(buffer.getvalue(), ImageOptions())


def test_oversized_frame_is_refused_before_decoding(tmp_path, digits):
    path = write_dicom(str(tmp_path / "big.dcm"), digits[0], DicomSpec(bits=8))
    with pytest.raises(BadInput, match="image too large"):
        decode_file(open(path, "rb").read(), ImageOptions(max_pixels=100))


# pydicom's own files: accepted, or rejected with the reason that fits.
SHIPPED = {
    "CT_small.dcm": None,
    "MR_small.dcm": None,
    "MR_small_RLE.dcm": None,
    "MR_small_bigendian.dcm": None,
    "MR_small_implicit.dcm": None,
    "MR_small_jp2klossless.dcm": None,
    "MR_small_jpeg_ls_lossless.dcm": None,
    "JPEG2000.dcm": None,
    "JPGExtended.dcm": None,
    "SC_rgb_rle.dcm": None,
    "SC_rgb_jpeg_dcmtk.dcm": None,
    "SC_rgb_rle_2frame.dcm": None,
    "examples_palette.dcm": None,
    "examples_ybr_color.dcm": None,
    "image_dfl.dcm": None,
    "rtplan.dcm": "non-image SOP class: RT Plan Storage",
    "rtdose.dcm": "non-image SOP class: RT Dose Storage",
    "test-SR.dcm": "non-image SOP class: Comprehensive SR Storage",
    "waveform_ecg.dcm": "non-image SOP class: 12-lead ECG Waveform Storage",
    "liver_1frame.dcm": "non-image SOP class: Segmentation Storage",
    "ExplVR_LitEndNoMeta.dcm": "non-image SOP class: RT Ion Plan Storage",  # found without preamble
    "empty_charset_LEI.dcm": "no pixel data",
    "MR_truncated.dcm": "cannot decode DICOM pixel data",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_pydicom_shipped_files_are_accepted_or_rejected_with_the_right_reason(name):
    data = open(os.path.join(TEST_FILES, name), "rb").read()
    expected = SHIPPED[name]
    if expected is None:
        chw, info = decode_file(data, ImageOptions(channels=3), name)
        assert chw.shape == (3, 28, 28) and chw.dtype == np.uint8 and chw.max() > chw.min()
        assert info is not None and info.sop_instance_uid
    else:
        with pytest.raises(BadInput, match=expected):
            decode_file(data, ImageOptions(), name)


def test_identifying_tags_are_never_parsed():
    # CT_small carries PatientName 'CompressedSamples^CT1': the decoder's parse skips it entirely.
    data = open(os.path.join(TEST_FILES, "CT_small.dcm"), "rb").read()
    assert b"CompressedSamples^CT1" in data
    ds = dicom._read(data)
    assert "PatientName" not in ds and "PatientBirthDate" not in ds
    assert not {"PatientName", "PatientBirthDate", "PatientAddress", "OtherPatientIDs"} & set(dicom.READ_TAGS)
    image = dicom.decode_dicom(data, 28, 1, ["file"])
    assert "CompressedSamples" not in repr({k: v for k, v in vars(image).items() if k != "chw"})


def test_an_unreadable_file_is_rejected_without_its_path(tmp_path, digits):
    # Export folders carry patient names; with --hash-paths the reject reason must not bring the
    # path back (an OSError's message names the file). The file vanished between listing and reading.
    from ray_app.workloads.image import ImagePreparer, ImageWorkload

    folder = tmp_path / "Doe^Jane_19700101"
    present = write_dicom(str(folder / "a.dcm"), digits[0], DicomSpec(bits=8, patient_id="PX-1"))
    missing = str(folder / "b.dcm")
    options = ImageOptions(hash_paths=True).model_dump()
    batch = {
        "kind": np.array(["file", "file"], dtype=object),
        "uri": np.array([present, missing], dtype=object),
        "label": np.array([0, 0]),
        "split": np.array(["train", "train"], dtype=object),
        "start": np.array([0, 0]),
        "stop": np.array([0, 0]),
    }
    rows = ImagePreparer(options, {"split_fractions": [0.0, 0.0]})(batch).to_pylist()
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "rejected"
    assert rows[1]["reject_reason"] == "cannot read file: No such file or directory"
    assert "Doe" not in repr(rows[1])
    items, ids, reasons = ImageWorkload().load_predict_batch({"path": [present, missing]}, ImageOptions(**options), {})
    assert items[1] is None and reasons[1] == "cannot read file: No such file or directory" and "Doe" not in ids[1]


def test_the_window_trained_with_is_the_one_predict_and_serve_decode_with(tmp_path, digits):
    # A CT whose own Window Center/Width (40/400, soft tissue) differs from the lung window the
    # model is prepared with: batch predict and the endpoint must decode with lung, from the
    # bundle alone, and refuse a contradicting --window.
    from ray_app.bundle import load_bundle, save_bundle
    from ray_app.workloads.base import OptionConflict
    from ray_app.workloads.image import ImageWorkload

    path = write_dicom(str(tmp_path / "ct.dcm"), digits[0], DicomSpec(bits=12, intercept=-1024.0, window=(40, 400)))
    data = open(path, "rb").read()
    trained = ImageOptions(window="lung")
    manifest = {"classes": ["a", "b"], "shape": [1, 28, 28]}
    save_bundle(ImageWorkload().build_model(trained, manifest), str(tmp_path / "bundle"), {
        "workload": "image", "options": trained.model_dump(), "manifest": manifest, "metrics": {}, "training": {}})  # fmt: skip
    bundle = load_bundle(str(tmp_path / "bundle"))
    lung = dicom.decode_dicom(data, 28, 1, ["lung"]).chw
    assert not np.array_equal(lung, dicom.decode_dicom(data, 28, 1, ["file"]).chw)
    workload = ImageWorkload()
    for stage in ("predict", "serve"):
        options = workload.resolve_options(stage, {}, bundle.options.model_dump())
        assert options.window == ["lung"]
        with pytest.raises(OptionConflict, match="recorded at prepare"):
            workload.resolve_options(stage, {"window": ["file"]}, bundle.options.model_dump())
    assert np.array_equal(bundle.workload.decode_item(data, bundle.options, bundle.manifest), lung)  # the endpoint's decode
    items, _, reasons = workload.load_predict_batch({"path": [path]}, bundle.options, bundle.manifest)  # batch predict's
    assert reasons == [None] and np.array_equal(items[0], lung)
