"""DICOM series reading (hermes.data.dicom) against series written here with pydicom, and
hermes.segment() on a DICOM folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from segment_helpers import grid, oracle_model, phantom, rotation  # noqa: E402

import hermes  # noqa: E402
from hermes.data.dicom import DicomError, is_dicom_file, load_dicom_series  # noqa: E402
from hermes.inference.geometry import resample_to_grid  # noqa: E402
from hermes.inference.segment import load_input  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(folder: Path, volume: np.ndarray, ras_affine: np.ndarray, slope: float = 1.0,
                 intercept: float = 0.0, series_uid: str | None = None, order=None,
                 modality: str = "CT") -> list[Path]:
    """One CT slice file per ``volume[:, :, k]`` (int16 stored = (value - intercept) / slope),
    placed by the RAS affine converted to DICOM's LPS; file names in ``order`` (shuffled)."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ ras_affine
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = [*(lps[:3, 0] / dc), *(lps[:3, 1] / dr)]
    series_uid = series_uid or generate_uid()
    nz = volume.shape[2]
    names = list(range(nz)) if order is None else list(order)
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [float(dr), float(dc)]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype("<i2")
        ds.PixelData = stored.tobytes()
        p = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(p)
    return paths


def _same_world_content(arr, aff, ref, ref_aff):
    """The read volume holds the reference's value at every world point of its grid."""
    m = np.linalg.inv(ref_aff) @ aff
    assert np.allclose(m, np.round(m), atol=1e-4), "grids are not related by a permutation/flip"
    back = resample_to_grid(ref, ref_aff, aff, arr.shape, order=0)
    np.testing.assert_allclose(arr, back)


@pytest.mark.parametrize("case", ["axial", "oblique_reversed"])
def test_series_geometry_and_values(tmp_path, case):
    shape = (20, 16, 9)
    if case == "axial":
        linear = np.diag([0.7, 0.8, 2.5])
    else:  # oblique plane, slices stored against the normal (left-handed)
        linear = rotation(0, 30) @ rotation(2, -15) @ np.diag([0.7, 0.8, -2.5])
    aff = grid(linear, shape)
    aff[:3, 3] += [12.0, -30.0, 55.0]
    vol = np.random.default_rng(0).integers(-1000, 2000, shape).astype(np.float32)
    rng = np.random.default_rng(1)
    write_series(tmp_path / "s", vol, aff, slope=2.0, intercept=-1024.0,
                 order=rng.permutation(shape[2]))
    (tmp_path / "s" / "README.txt").write_text("not dicom")  # ignored
    assert is_dicom_file(next((tmp_path / "s").glob("*.dcm")))
    arr, raff = load_dicom_series(tmp_path / "s")
    assert arr.dtype == np.float32 and arr.shape == shape
    # stored = round((v + 1024) / 2) -> read back = stored * 2 - 1024
    ref = np.round((vol + 1024) / 2) * 2 - 1024
    if case == "axial":
        np.testing.assert_allclose(raff, aff, atol=1e-4)
        np.testing.assert_array_equal(arr, ref)
    else:  # read in increasing position along the normal: slice order reversed
        np.testing.assert_allclose(raff[:3, :2], aff[:3, :2], atol=1e-4)
        np.testing.assert_allclose(raff[:3, 2], -aff[:3, 2], atol=1e-4)
        np.testing.assert_array_equal(arr, ref[:, :, ::-1])
    _same_world_content(arr, raff, ref, aff)
    # world position of voxel (3, 5, 2) of the source equals its DICOM LPS position, in RAS
    lps_pos = (LPS @ aff @ [3, 5, 2, 1])[:3]
    k = 2 if case == "axial" else shape[2] - 1 - 2
    np.testing.assert_allclose((LPS @ raff @ [3, 5, k, 1])[:3], lps_pos, atol=1e-4)


def test_series_errors(tmp_path):
    with pytest.raises(DicomError, match="no DICOM image slice"):
        (tmp_path / "empty").mkdir()
        load_dicom_series(tmp_path / "empty")
    vol = np.zeros((8, 8, 5), np.float32)
    vol[2:5, 2:5, 1:4] = 100
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    paths = write_series(tmp_path / "gap", vol, aff)
    paths[2].unlink()
    with pytest.raises(DicomError, match="non-uniform slice spacing"):
        load_dicom_series(tmp_path / "gap")
    paths = write_series(tmp_path / "spacing", vol, aff)
    odd = pydicom.dcmread(paths[3])
    odd.PixelSpacing = [1.0, 1.2]
    odd.save_as(paths[3])
    with pytest.raises(DicomError, match=r"different PixelSpacing \(1 x 1 and 1 x 1.2 mm\)"):
        load_dicom_series(tmp_path / "spacing")
    paths = write_series(tmp_path / "damaged", vol, aff)
    paths[-1].write_bytes(b"garbage\n")  # the last slice of a failed copy: not left out
    (tmp_path / "damaged" / "notes.txt").write_text("not DICOM, and not named so: ignored")
    with pytest.raises(DicomError, match=r"1 file\(s\) named as DICOM are not readable DICOM "
                                         rf"\({paths[-1].name}\)"):
        load_dicom_series(tmp_path / "damaged")
    paths[-1].unlink()
    assert load_dicom_series(tmp_path / "damaged")[0].shape == (8, 8, 4)
    write_series(tmp_path / "one", vol[:, :, :1], aff)
    with pytest.raises(DicomError, match="single slice"):
        load_dicom_series(tmp_path / "one")
    for name, change, message in (
            ("frames", lambda ds: setattr(ds, "NumberOfFrames", 5),
             r"multi-frame DICOM \(IM0000.dcm.*\) is not supported; convert it"),
            ("nospacing", lambda ds: delattr(ds, "PixelSpacing"),
             r"pixel spacing found \(5 image file\(s\) without PixelSpacing\)")):
        for p in write_series(tmp_path / name, vol, aff):
            ds = pydicom.dcmread(p)
            change(ds)
            ds.save_as(p)
        with pytest.raises(DicomError, match=message):
            load_dicom_series(tmp_path / name)
    write_series(tmp_path / "two", vol, aff, series_uid="1.2.3.4")
    write_series(tmp_path / "two" / "..", vol, aff, series_uid="1.2.3.5")  # sibling folder
    for p in (tmp_path).glob("IM*.dcm"):
        p.rename(tmp_path / "two" / f"b_{p.name}")
    with pytest.raises(DicomError, match="holds 2 series"):
        load_dicom_series(tmp_path / "two")
    arr, _ = load_dicom_series(tmp_path / "two", series_uid="1.2.3.5")
    assert arr.shape == (8, 8, 5)
    # the path of one file reads that file's series
    other = [p.rename(tmp_path / "two" / f"c_{p.name}")
             for p in write_series(tmp_path / "third", vol[:, :, :3], aff, series_uid="1.2.3.6")]
    with pytest.raises(DicomError, match="holds 3 series.*path of one of its files"):
        load_input(tmp_path / "two")
    arr, _, _ = load_input(other[1])
    assert arr.shape == (8, 8, 3)


def test_segment_dicom_folder(tmp_path):
    """A DICOM series (oblique, reversed slices) segments to the ground truth moved by the same
    geometry, and the result's grid is the series' grid."""
    linear = rotation(1, 18) @ np.diag([1.5, 1.5, -1.5])
    shape = (60, 52, 46)
    aff = grid(linear, shape)
    img, gt = phantom(aff, shape)
    write_series(tmp_path / "ct", img, aff)
    arr, raff = load_dicom_series(tmp_path / "ct")
    res = hermes.segment(tmp_path / "ct", tasks=["left_blob", "right_blob"], modality="T1",
                         model=oracle_model(), device="cpu")
    np.testing.assert_allclose(res.affine, raff)
    expected = gt["left_blob"][:, :, ::-1]  # the reader orders slices along the normal
    np.testing.assert_array_equal(res.masks[0], expected)
    np.testing.assert_array_equal(res.masks[1], gt["right_blob"][:, :, ::-1])
    # a single slice file given as input reads its whole series
    one = hermes.segment(next((tmp_path / "ct").glob("*.dcm")), tasks="left_blob",
                         modality="T1", model=oracle_model(), device="cpu")
    np.testing.assert_array_equal(one.masks[0], expected)


def test_auto_modality_from_the_dicom_tag(tmp_path, monkeypatch):
    """``modality="auto"`` on a DICOM series: CT and PT tags decide without the modality head,
    MR narrows the head's choice to the model's MR modalities, a tag the model does not know
    is named; NIfTI-like inputs (no tag) keep the head's detection."""
    import hermes.inference.segment as seg
    import hermes.models as hm

    aff = grid(np.diag([1.5, 1.5, 1.5]), (40, 36, 30))
    img, _ = phantom(aff, (40, 36, 30))
    for tag in ("CT", "MR", "PT", "US"):
        write_series(tmp_path / tag, img, aff, modality=tag)
    assert seg.dicom_modality(tmp_path / "MR") == "MR"
    assert seg.dicom_modality(next((tmp_path / "PT").glob("*.dcm"))) == "PT"
    assert seg.dicom_modality(tmp_path / "MR" / "nothing.nii.gz") is None
    asked = []
    real = seg.detect_modality
    monkeypatch.setattr(seg, "detect_modality",
                        lambda *a, **k: asked.append(k.get("candidates")) or real(*a, **k))
    run = dict(modality="auto", model=oracle_model(answer="T1"), device="cpu")
    ct = hermes.segment(tmp_path / "CT", tasks="liver", **run)
    assert ct.modality == "CT" and ct.detection == {"modality": "CT", "dicom_modality": "CT"}
    assert asked == []
    mr = hermes.segment(tmp_path / "MR", tasks="left_blob", **run)  # T1: the only MR modality
    assert mr.modality == "T1" and asked == []
    with pytest.raises(seg.ModalityDetectionError, match="is PT .* does not know"):
        hermes.segment(tmp_path / "PT", **run)
    us = hermes.segment(tmp_path / "US", tasks="left_blob", **run)  # no say: the head decides
    assert us.modality == "T1" and us.detection["dicom_modality"] == "US" and asked == [None]
    assert us.detection["confidence"] > 0.85 and "confidence" in repr(us)
    # MR among several MR modalities: the head chooses among them only, renormalised
    official = hm.official_vocabulary()
    mr_rows = seg._tagged_modalities(official, "MR")
    assert [official.canonical_modality(m) for m in ("T1", "T2", "CINE")] == mr_rows[:3]
    assert len(mr_rows) == 4 and seg._tagged_modalities(official, "CT") == ["CT"]
    flair = hm.build("tiny", tasks=["lesion"], modalities=["CT", "T1", "FLAIR"]).vocab
    assert seg._tagged_modalities(flair, "MR") == ["T1", "FLAIR"]  # a declared MR sequence
    chans = img[None] + 0.0
    params = seg._preprocess_params(run["model"].hermes_metadata, None, True)
    mod, conf, scores = real(run["model"], chans, aff, params, torch.device("cpu"),
                             candidates=["CT"])
    assert (mod, conf, scores) == ("CT", 1.0, {"CT": 1.0})
    # an unsure head on a CT-like array (no tag) names the likely modality
    monkeypatch.setattr(seg, "detect_modality", lambda *a, **k: ("T1", 0.4, {}))
    with pytest.raises(seg.ModalityDetectionError, match="reach -1000, as CT's Hounsfield"):
        hermes.segment(np.where(img > 0, img, -1000.0), spacing=1.5, **run)
