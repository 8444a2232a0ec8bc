"""Image I/O: NIfTI/NRRD round trips with known geometry, LPS->RAS, corrupt files."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest

from hermes.data.io import (
    ImageReadError,
    axcodes,
    load_header,
    load_image,
    nifti_geometry,
    save_image,
    spacing_from_affine,
    strip_image_suffix,
)


def _affine():
    a = np.array([[0.0, 0.0, -2.5, 40.0], [-0.8, 0.0, 0.0, 12.0], [0.0, 1.2, 0.0, -7.0],
                  [0, 0, 0, 1]])
    return a


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_round_trip_keeps_data_and_ras_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    p = save_image(tmp_path / f"x{suffix}", data, _affine())
    arr, aff = load_image(p)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, _affine(), atol=1e-5)
    shape, aff_h = load_header(p)
    assert shape == (5, 6, 7)
    np.testing.assert_allclose(aff_h, aff, atol=1e-6)


def test_nrrd_lps_header_is_converted_to_ras(tmp_path):
    # Hand-written LPS NRRD (as ITK / 3D Slicer / pyradiomics write it).
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    dirs = np.array([[0.7, 0.0, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 5.0]])  # rows: per axis
    origin = np.array([-100.0, 50.0, 20.0])
    header = {"space": "left-posterior-superior", "space directions": dirs,
              "space origin": origin, "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "x.nrrd"), data, header, index_order="F")
    arr, aff = load_image(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(arr, data)
    # voxel (1, 2, 3) in LPS: origin + 1*d0 + 2*d1 + 3*d2; in RAS x and y flip sign
    lps = origin + 1 * dirs[0] + 2 * dirs[1] + 3 * dirs[2]
    ras = aff @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
    assert axcodes(aff) == ("L", "P", "S")
    np.testing.assert_allclose(spacing_from_affine(aff), [0.7, 0.7, 5.0])


@pytest.mark.parametrize("header", [
    {"space dimension": 3, "space directions": np.array([[0.0, 1.0, 0], [2.0, 0, 0], [0, 0, 3.0]]),
     "space origin": np.array([10.0, -20.0, 5.0])},
    {"spacings": [1.0, 2.0, 3.0]},
    {},
])
def test_nrrd_without_a_space_is_lps_as_itk_reads_it(tmp_path, header):
    """No ``space`` named: the coordinates are LPS, as ITK / 3D Slicer take them (SimpleITK
    gives origin (10, -20, 5) with direction columns (0,1,0), (1,0,0), (0,0,1) for the first
    header and origin 0, identity direction for the others)."""
    data = np.zeros((2, 3, 4), np.float32)
    sized = bool(header)
    nrrd.write(str(tmp_path / "x.nrrd"), data, dict(header), index_order="F")
    if sized:
        _, aff = load_image(tmp_path / "x.nrrd")
    else:  # no voxel size at all: said
        with pytest.warns(UserWarning, match="x.nrrd: the NRRD header gives no voxel size"):
            _, aff = load_image(tmp_path / "x.nrrd")
    if "space directions" in header:
        lps = header["space origin"] + header["space directions"].T @ np.array([1.0, 2.0, 3.0])
    else:
        lps = np.array([1.0, 2.0, 3.0]) * header.get("spacings", [1.0, 1.0, 1.0])
    np.testing.assert_allclose((aff @ [1.0, 2.0, 3.0, 1.0])[:3], [-lps[0], -lps[1], lps[2]])


def test_nrrd_channel_axis_goes_last(tmp_path):
    data = np.random.default_rng(1).random((2, 4, 5, 6)).astype(np.float32)  # channel first
    header = {"space": "RAS", "kinds": ["list", "domain", "domain", "domain"],
              "space directions": [[np.nan] * 3, [1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]]}
    nrrd.write(str(tmp_path / "c.nrrd"), data, header, index_order="F")
    arr, aff = load_image(tmp_path / "c.nrrd")
    assert arr.shape == (4, 5, 6, 2)
    np.testing.assert_array_equal(arr[..., 1], data[1])
    np.testing.assert_allclose(np.diag(aff)[:3], [1, 2, 3])
    assert load_header(tmp_path / "c.nrrd")[0] == (4, 5, 6, 2)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_damaged_nifti_gz_data_is_refused(tmp_path, image_class):
    """nibabel stops reading where the voxels end, before the gzip CRC: damaged compressed
    data must not come back as other voxel values."""
    import gzip
    import random

    data = np.random.default_rng(0).normal(0, 300, (24, 20, 16)).astype(np.int16)
    raw = gzip.compress(image_class(data, _affine()).to_bytes())
    (tmp_path / "ok.nii.gz").write_bytes(raw)
    arr, aff = load_image(tmp_path / "ok.nii.gz")
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(aff, _affine(), atol=1e-6)
    rng = random.Random(0)
    for _ in range(10):  # one flipped bit in the deflate data, anywhere
        damaged = bytearray(raw)
        damaged[rng.randrange(20, len(raw) - 8)] ^= 1 << rng.randrange(8)
        (tmp_path / "bad.nii.gz").write_bytes(bytes(damaged))
        with pytest.raises(ImageReadError, match="bad.nii.gz: cannot read image"):
            load_image(tmp_path / "bad.nii.gz")

def test_nifti_scaling_applied_for_float_dtype(tmp_path):
    img = nib.Nifti1Image(np.array([[[1, 2]]], np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    arr, _ = load_image(tmp_path / "s.nii.gz", dtype=np.float32)
    np.testing.assert_allclose(arr.ravel(), [-1022.0, -1020.0])


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        load_image(bad)
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        load_header(bad)
    trunc = tmp_path / "trunc.nrrd"
    save_image(trunc, np.ones((8, 8, 8), np.float32), np.eye(4))
    trunc.write_bytes(trunc.read_bytes()[:-40])
    with pytest.raises(ImageReadError, match="trunc.nrrd"):
        load_image(trunc)
    with pytest.raises(ImageReadError, match="nothere.nii.gz.*not found"):
        load_image(tmp_path / "nothere.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="not a recognised image type"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageReadError, match="series_3: file not found"):
        load_image(tmp_path / "patient" / "series_3")  # a mistyped DICOM folder


@pytest.mark.parametrize("unit, per_mm", [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0)])
def test_nifti_spatial_units_are_read_as_mm(tmp_path, unit, per_mm):
    aff_mm = _affine()
    aff_file = aff_mm.copy()
    aff_file[:3, :] *= per_mm  # the same grid written in the file's unit
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), aff_file)
    img.set_qform(aff_file, code=4)
    img.set_sform(aff_file, code=2)
    img.header.set_xyzt_units(unit)
    nib.save(img, str(tmp_path / "u.nii.gz"))
    _, aff = load_image(tmp_path / "u.nii.gz")
    np.testing.assert_allclose(aff, aff_mm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(load_header(tmp_path / "u.nii.gz")[1], aff_mm, rtol=1e-6,
                               atol=1e-6)
    geo = nifti_geometry(nib.load(str(tmp_path / "u.nii.gz")))
    assert (geo["qform_code"], geo["sform_code"]) == (4, 2)
    np.testing.assert_allclose(geo["sform"], aff_mm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(geo["qform"], aff_mm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("code", [0, 5, 7, 66])  # unknown, undefined, bad time bits + mm
def test_nifti_unknown_or_odd_unit_codes_read_as_mm(tmp_path, code):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), _affine())
    img.header["xyzt_units"] = code
    nib.save(img, str(tmp_path / "u.nii.gz"))
    np.testing.assert_allclose(load_image(tmp_path / "u.nii.gz")[1], _affine(), atol=1e-6)


def test_nifti_geometry_follows_an_in_memory_affine():
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), _affine())
    img.set_qform(_affine(), code=4)
    assert nifti_geometry(img)["qform_code"] == 4
    img.affine[:3, 3] += 10.0  # nibabel writes img.affine: the stale header geometry is dropped
    assert nifti_geometry(img) is None


def test_strip_suffix():
    assert strip_image_suffix("case_0001.nii.gz") == "case_0001"
    assert strip_image_suffix("a.b.nrrd") == "a.b"


def test_implausible_resampled_size_is_refused():
    from hermes.data.geometry import resampled_grid

    metres = np.diag([2000.0, 2000.0, 2000.0, 1.0])  # a 2 mm grid whose header says metres
    with pytest.raises(ValueError, match=r"64 x 64 x 64 voxels of 2000 x 2000 x 2000 mm to "
                                         r"1.5 x 1.5 x 1.5 mm would give 85333 x .*unit"):
        resampled_grid((64, 64, 64), metres, 1.5)
    assert resampled_grid((64, 64, 64), np.diag([2.0, 2.0, 2.0, 1.0]), 1.5)[0] == (85, 85, 85)


def test_folder_lock_refuses_a_second_writer_and_leaves_nothing(tmp_path):
    import subprocess
    import sys

    from hermes.files import LOCK_NAME, FolderBusyError, folder_lock

    probe = (f"from hermes.files import folder_lock\nwith folder_lock({str(tmp_path)!r}, "
             "'run folder'): pass")
    with folder_lock(tmp_path, "run folder"):
        other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"run folder {tmp_path} is being written by another Hermes process (pid " \
               f"{os.getpid()})" in other.stderr
        with pytest.raises(FolderBusyError):  # another open file description: refused too
            with folder_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    with folder_lock(tmp_path):  # free again
        pass


def test_atomic_write_names_the_file_and_takes_long_names(tmp_path):
    from hermes.files import atomic_write_bytes

    long = tmp_path / ("m" * 250)  # the temporary name must not exceed the limit
    atomic_write_bytes(long, [b"x"])
    assert long.read_bytes() == b"x" and sorted(os.listdir(tmp_path)) == [long.name]
    target = tmp_path / "blocker" / "labels.json"
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OSError, match=r"\(writing .*blocker/labels.json\)"):
        atomic_write_bytes(target, [b"x"])


def test_nifti_of_complex_or_rgb_voxels_is_refused(tmp_path):
    import hermes
    from hermes.data.io import ImageReadError

    real = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    complex_img = nib.Nifti1Image(real.astype(np.complex64), np.eye(4))
    nib.save(complex_img, tmp_path / "phase.nii.gz")
    with pytest.raises(ImageReadError, match="complex-valued voxels .*magnitude"):
        load_image(tmp_path / "phase.nii.gz", dtype=np.float32)
    with pytest.raises(ImageReadError, match="complex-valued"):
        hermes.segment(complex_img, modality="T1")
    rgb = np.zeros((6, 5, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    with pytest.raises(ImageReadError, match="RGB/structured voxels"):
        load_image(tmp_path / "rgb.nii", dtype=np.float32)


def test_uncompressed_nifti_named_nii_gz_is_read(tmp_path):
    arr = np.arange(120, dtype=np.int16).reshape(6, 5, 4)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "plain.nii")
    (tmp_path / "plain.nii").rename(tmp_path / "named.nii.gz")
    data, got = load_image(tmp_path / "named.nii.gz")
    np.testing.assert_array_equal(data, arr)
    np.testing.assert_allclose(got, aff)
    assert load_header(tmp_path / "named.nii.gz") == ((6, 5, 4), pytest.approx(aff))


@pytest.mark.parametrize("space", ["scanner-xyz", "3D-right-handed", "left-posterior-superior"])
def test_nrrd_scanner_and_right_handed_spaces_are_lps_as_itk_reads_them(tmp_path, space):
    arr = np.zeros((4, 3, 2), np.int16)
    header = {"space": space, "space directions": np.diag([2.0, 3.0, 4.0]),
              "space origin": np.array([10.0, 20.0, 30.0])}
    nrrd.write(str(tmp_path / "v.nrrd"), arr, header, index_order="F")
    _, aff = load_image(tmp_path / "v.nrrd")
    np.testing.assert_allclose(aff, [[-2, 0, 0, -10], [0, -3, 0, -20], [0, 0, 4, 30],
                                     [0, 0, 0, 1]])


@pytest.mark.parametrize("centering, shift", [(None, 0.5), ("cell", 0.5), ("node", 0.0)])
def test_nrrd_axis_mins_place_the_grid_as_itk_does(tmp_path, centering, shift):
    """An NRRD with ``kinds``, ``spacings`` and ``axis mins`` but no ``space directions``
    (teem's way to place a grid): LPS axes, the first voxel at the axis mins plus half a
    spacing for cell centering (ITK's default), as SimpleITK reads it."""
    arr = np.zeros((6, 5, 4), np.int16)
    header = {"kinds": ["domain"] * 3, "spacings": [1.5, 2.0, 3.0],
              "axis mins": [10.0, 20.0, 30.0]}
    if centering:
        header["centerings"] = [centering] * 3
    nrrd.write(str(tmp_path / "v.nrrd"), arr, header, index_order="F")
    _, aff = load_image(tmp_path / "v.nrrd")
    lps_origin = np.array([10.0, 20.0, 30.0]) + shift * np.array([1.5, 2.0, 3.0])
    np.testing.assert_allclose(aff[:3, 3], lps_origin * [-1, -1, 1])
    np.testing.assert_allclose(np.diag(aff)[:3], [-1.5, -2.0, 3.0])
    assert load_header(tmp_path / "v.nrrd")[1] == pytest.approx(aff)


def test_folder_lock_waits_when_asked(tmp_path):
    """A training run on a collection another process is preprocessing waits for that cache
    instead of failing (waiting=...): told so, then it gets the lock once the other lets go."""
    import subprocess
    import sys

    from hermes.files import folder_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys\nfrom hermes.files import folder_lock\nwith folder_lock({str(tmp_path)!r}):"
        "\n    print('held', flush=True)\n    sys.stdin.readline()\nprint('released', flush=True)"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said: list[str] = []

    def waiting(line: str) -> None:  # told it waits: let the holder finish
        said.append(line)
        holder.stdin.write("go\n")
        holder.stdin.flush()

    with folder_lock(tmp_path, "cache folder", waiting=waiting):
        assert holder.stdout.readline().strip() == "released"  # we hold it after the other
    holder.wait(timeout=30)
    assert len(said) == 1 and "is being written by another Hermes process" in said[0]
    assert "waiting for it" in said[0]
