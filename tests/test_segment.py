"""hermes.segment(): geometry round trips against a world-space ground truth, tasks, modality,
post-processing, errors, and a real (tiny) model end to end."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from segment_helpers import (  # noqa: E402
    BACK_MAPPING_GRIDS,
    MODALITIES,
    TASKS,
    back_mapper,
    dice,
    grid,
    oracle_model,
    phantom,
    rotation,
)

import hermes  # noqa: E402
import hermes.models as hm  # noqa: E402
from hermes.data.io import ImageReadError, load_image, save_image  # noqa: E402
from hermes.inference._workspace import cached_bytes, clear_workspace  # noqa: E402
from hermes.inference.segment import (  # noqa: E402
    DEFAULT_SW_BATCH,
    ModalityDetectionError,
    SegmentationInputError,
    resolve_sw_batch,
    resolve_tasks,
)

torch.set_num_threads(1)
BLOBS = ["left_blob", "right_blob"]

# (name, linear part of the affine (columns = world step per voxel axis), shape)
EXACT_GRIDS = {
    "ras": (np.diag([1.5, 1.5, 1.5]), (60, 52, 46)),
    "flipped": (np.diag([-1.5, 1.5, -1.5]), (60, 52, 46)),  # L, A, I
    "permuted": (np.array([[0, 0, 1.5], [-1.5, 0, 0], [0, -1.5, 0]]), (46, 60, 52)),  # P, I, R
    "oblique": (rotation(2, 20) @ rotation(0, -12) @ np.diag([1.5, -1.5, 1.5]), (62, 56, 50)),
}


def _on_grid(name: str, small_blob: bool = False):
    """``(affine, image, {structure: mask})``: the phantom on one of :data:`EXACT_GRIDS`."""
    linear, shape = EXACT_GRIDS[name]
    aff = grid(linear, shape)
    return (aff, *phantom(aff, shape, small_blob=small_blob))


def _run(img, aff, **kw):
    kw.setdefault("model", oracle_model())
    kw.setdefault("modality", "T1")
    kw.setdefault("tasks", BLOBS)
    kw.setdefault("device", "cpu")
    return hermes.segment(img, affine=aff, **kw)


@pytest.mark.parametrize("name", list(EXACT_GRIDS))
def test_exact_round_trip_at_model_spacing(name):
    """At the model's spacing no interpolation happens: reorientation/crop/back-mapping must
    return exactly the ground truth, in the original axis order, for any orientation."""
    aff, img, gt = _on_grid(name)
    res = _run(img, aff)
    assert res.labels.shape == img.shape and res.masks.shape == (2, *img.shape)
    np.testing.assert_array_equal(res.affine, aff)
    for t, task in enumerate(BLOBS):
        np.testing.assert_array_equal(res.masks[t], gt[task], err_msg=f"{name}: {task}")
    expected = np.zeros(img.shape, np.uint8)
    expected[gt["left_blob"]] = 1
    expected[gt["right_blob"]] = 2
    np.testing.assert_array_equal(res.labels, expected)
    # the label image carries the original geometry
    np.testing.assert_allclose(res.label_image.affine, aff)


@pytest.mark.parametrize("case", ["anisotropic", "oblique_fine", "permuted_thick"])
def test_resampled_round_trip(case):
    """Grids finer/coarser than the model's: masks on the original grid match the ground truth
    moved by the same geometry (Dice), and volumes match the ellipsoids' analytic volumes."""
    if case == "anisotropic":
        linear, shape = np.diag([0.9, -0.9, 3.0]), (100, 84, 26)
    elif case == "oblique_fine":
        linear, shape = rotation(1, 25) @ np.diag([1.1, 1.2, 1.0]), (84, 72, 80)
    else:
        linear, shape = np.array([[0, 0, -1.0], [2.5, 0, 0], [0, 1.0, 0]]), (36, 80, 92)
    aff = grid(linear, shape)
    img, gt = phantom(aff, shape)
    res = _run(img, aff, probabilities=True)
    assert res.labels.shape == shape
    # masks alone come from the probabilities kept near each structure only: the same masks
    sparse = _run(img, aff)
    np.testing.assert_array_equal(np.asarray(sparse.masks), np.asarray(res.masks))
    np.testing.assert_array_equal(sparse.labels, res.labels)
    for t, task in enumerate(BLOBS):
        d = dice(res.masks[t], gt[task])
        assert d > 0.9, f"{case} {task}: Dice {d:.3f}"
    # the wrong orientation would put the blobs elsewhere: sanity of the test itself
    assert dice(res.masks[0], gt["left_blob"][::-1]) < 0.3
    vols = res.volumes_ml
    analytic = {"left_blob": 4 / 3 * np.pi * 9 * 7 * 11 / 1000,
                "right_blob": 4 / 3 * np.pi * 8 * 10 * 6 / 1000}
    for task in BLOBS:
        assert vols[task] == pytest.approx(analytic[task], rel=0.12)
    assert res.probabilities.dtype == np.float16
    assert res.probabilities.shape == (2, *shape)
    # label map = 1 + t of the smallest structure whose mask holds the voxel, else 0
    dense = np.asarray(res.masks)
    sizes = dense.reshape(len(BLOBS), -1).sum(1)
    rank = np.where(dense, sizes[:, None, None, None], np.iinfo(np.int64).max)
    expected = np.where(dense.any(0), rank.argmin(0) + 1, 0)
    np.testing.assert_array_equal(res.labels, expected)


def test_window_enlarged_for_axes_barely_longer_than_the_roi():
    """Axes up to 12.5% longer than the 32-voxel window get one window of their length; the
    (voxel-wise) result is the same as with the plain window layout."""
    img = np.random.default_rng(0).uniform(1, 200, (34, 60, 36)).astype(np.float32)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    adaptive = _run(img, aff, tasks=["left_blob"])
    plain = _run(img, aff, tasks=["left_blob"], roi_tolerance=0.0)
    assert adaptive.settings["roi_size"] == [34, 32, 36]
    assert adaptive.settings["train_roi_size"] == [32, 32, 32]
    assert adaptive.settings["windows"] == 1 * 3 * 1 and plain.settings["windows"] == 2 * 3 * 2
    np.testing.assert_array_equal(adaptive.masks[0], img > 100)
    np.testing.assert_array_equal(plain.masks[0], img > 100)


def test_grids_smaller_than_the_window_are_padded_as_in_training(monkeypatch):
    """A model grid shorter than the window is padded with the image minimum (training crops
    pad with each channel's minimum), not with the sliding window's 0 (the z-scored mean)."""
    from hermes.inference import sliding_window as sw

    seen, original = [], sw.sliding_window_inference

    def spy(x, *a, **k):
        seen.append(x.clone())
        return original(x, *a, **k)

    monkeypatch.setattr(sw, "sliding_window_inference", spy)
    img = np.random.default_rng(1).uniform(1, 200, (20, 40, 24)).astype(np.float32)
    res = _run(img, np.diag([1.5, 1.5, 1.5, 1.0]), tasks=["left_blob"])
    x = seen[0][0, 0].numpy()
    assert x.shape == (32, 40, 32)
    np.testing.assert_array_equal(x[6:26, :, 4:28], img)  # centred
    assert (x[:6] == img.min()).all() and (x[:, :, 28:] == img.min()).all()
    np.testing.assert_array_equal(res.masks[0], img > 100)


def test_inputs_nifti_nibabel_spacing_and_torch(tmp_path):
    aff, img, gt = _on_grid("flipped")
    path = save_image(tmp_path / "img.nii.gz", img, aff)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    a = _run(str(path), None)
    b = _run(nib.load(str(path)), None)
    c = _run(torch.from_numpy(img.copy()), aff)
    for r in (a, b, c):
        np.testing.assert_array_equal(r.labels, a.labels)
        np.testing.assert_allclose(r.affine, aff)
    np.testing.assert_array_equal(a.masks[0], gt["left_blob"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # input untouched
    # spacing only: axis-aligned RAS grid
    s = _run(img, None, spacing=(1.5, 1.5, 1.5))
    np.testing.assert_allclose(s.affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    np.testing.assert_array_equal(s.labels, a.labels)


def test_nrrd_lps_input_matches_nifti(tmp_path):
    aff, img, gt = _on_grid("permuted")
    nrrd_path = save_image(tmp_path / "img.nrrd", img, aff)  # written in LPS space
    assert "left-posterior-superior" in nrrd_path.read_bytes()[:2000].decode("latin1")
    res = _run(str(nrrd_path), None)
    np.testing.assert_allclose(res.affine, aff, atol=1e-9)
    for t, task in enumerate(BLOBS):
        np.testing.assert_array_equal(res.masks[t], gt[task])


def test_tasks_of_modality_and_groups():
    vocab = oracle_model().vocab
    assert resolve_tasks(vocab, None, "T1") == ["left_blob", "right_blob"]
    assert resolve_tasks(vocab, None, "CT") == ["liver"]
    assert resolve_tasks(vocab, "right_blob, left_blob", "T1") == ["right_blob", "left_blob"]
    with pytest.warns(UserWarning, match="other modalities than CT"):  # the blobs are T1's
        assert resolve_tasks(vocab, ["blobs", "liver"], "CT") == [*BLOBS, "liver"]
    with pytest.raises(hm.UnknownNameError, match="left_blb.*left_blob"):
        resolve_tasks(vocab, ["left_blb"], "T1")
    # groups without modality: every usable task
    plain = hm.build("tiny", tasks=TASKS, modalities=MODALITIES).vocab
    assert resolve_tasks(plain, None, "T1") == TASKS
    # official vocabulary: CHAOS ("T1 (in/out phase) or T2") is a T1 and a T2 group
    off = hm.official_vocabulary()
    t2 = resolve_tasks(off, None, "T2")
    assert t2 == off.group("chaos")
    # group names as users write the datasets ('BCV', 'KiTS'); unknown names list the groups
    assert resolve_tasks(off, "BCV", "CT") == off.group("bcv") == off.group("Bcv")
    with pytest.raises(hm.UnknownNameError, match="dataset groups: .*bcv"):
        resolve_tasks(off, "bcv_nope", "CT")
    assert set(off.group("brain_structure")) < set(resolve_tasks(off, None, "T1"))


def test_only_requested_tasks_are_computed():
    aff, img, gt = _on_grid("ras")
    seen = []
    net = oracle_model()
    forward = net.forward

    def spy(x, tasks=None, modality=None, **kw):
        seen.append((tuple(tasks), modality))
        return forward(x, tasks=tasks, modality=modality, **kw)

    net.forward = spy
    res = _run(img, aff, model=net, tasks="right_blob")
    assert res.task_names == ["right_blob"] and res.masks.shape[0] == 1
    assert set(seen) == {(("right_blob",), "T1")}
    np.testing.assert_array_equal(res.labels, gt["right_blob"].astype(np.uint8))


def test_modality_auto_detection_and_low_confidence():
    aff, img, gt = _on_grid("ras")
    res = _run(img, aff, modality="auto", tasks=None)  # oracle head says T1 with p ~ 0.9
    assert res.modality == "T1" and res.detection["modality"] == "T1"
    assert 0.85 < res.detection["confidence"] < 0.95
    assert res.task_names == BLOBS  # the tasks of the detected modality
    with pytest.raises(ModalityDetectionError, match=r"confidence 0\.\d+ for T1 .*modality="):
        _run(img, aff, modality="auto", modality_threshold=0.95)
    ct = _run(img, aff, modality="auto", tasks=None, model=oracle_model(answer="CT"))
    assert ct.modality == "CT" and ct.task_names == ["liver"] and not ct.labels.any()


def test_postprocessing_largest_component_and_min_volume():
    aff, img, gt = _on_grid("ras", small_blob=True)
    raw = _run(img, aff)
    np.testing.assert_array_equal(raw.masks[1], gt["right_blob"] | gt["small"])
    big = _run(img, aff, postprocess={"right_blob": "largest"})
    np.testing.assert_array_equal(big.masks[1], gt["right_blob"])
    np.testing.assert_array_equal(big.masks[0], gt["left_blob"])  # other task untouched
    small_ml = gt["small"].sum() * 1.5 ** 3 / 1000
    rm = _run(img, aff, postprocess={"min_volume_ml": small_ml * 1.5})
    np.testing.assert_array_equal(rm.masks[1], gt["right_blob"])
    keep = _run(img, aff, postprocess={"min_volume_ml": small_ml * 0.5})
    np.testing.assert_array_equal(keep.masks[1], raw.masks[1])
    assert not rm.labels[gt["small"]].any()
    with pytest.raises(ValueError, match="unknown keys"):
        _run(img, aff, postprocess={"largest": True, "biggest": 1})


def test_bad_inputs_are_named(tmp_path):
    aff, img, _ = _on_grid("ras")
    with pytest.raises(hm.UnknownNameError, match="unknown task 'kidney'"):
        _run(img, aff, tasks=["kidney"])
    with pytest.raises(hm.UnknownNameError, match="unknown modality 'XR'"):
        _run(img, aff, modality="XR")
    with pytest.raises(SegmentationInputError, match="2-D"):
        _run(img[:, :, 10], np.eye(4))
    with pytest.raises(SegmentationInputError, match="2-D"):
        _run(img[:, :, 10:11], aff)
    bad = img.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(SegmentationInputError, match="1 non-finite"):
        _run(bad, aff)
    with pytest.raises(SegmentationInputError, match="empty"):
        _run(np.zeros(img.shape, np.float32), aff)
    with pytest.raises(SegmentationInputError, match="affine= .* or spacing="):
        _run(img, None)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageReadError, match="corrupt.nii.gz"):
        _run(str(corrupt), None)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        _run(str(other), None)
    with pytest.raises(ValueError, match="threshold"):
        _run(img, aff, threshold=1.5)
    with pytest.raises(ImageReadError, match="series_2: file not found"):
        _run(str(tmp_path / "patient" / "series_2"), None)
    with pytest.raises(SegmentationInputError, match=r"channel-first .* pass image\[0\]"):
        _run(torch.from_numpy(img)[None], aff)


def test_save_outputs(tmp_path):
    aff, img, gt = _on_grid("oblique")
    res = _run(img, aff, probabilities=True)
    written = res.save(tmp_path / "out", per_structure=True, probabilities=True)
    lab, lab_aff = load_image(written["labels"])
    np.testing.assert_array_equal(lab, res.labels)
    np.testing.assert_allclose(lab_aff, aff, atol=1e-5)
    names = json.loads(written["names"].read_text())
    assert names["labels"] == {"0": "background", "1": "left_blob", "2": "right_blob"}
    assert names["modality"] == "T1"
    mask, _ = load_image(written["mask:right_blob"])
    np.testing.assert_array_equal(mask.astype(bool), gt["right_blob"])
    prob, _ = load_image(written["prob:left_blob"])
    np.testing.assert_allclose(prob, res.probabilities[0].astype(np.float32))
    stats = json.loads(written["statistics_json"].read_text())["structures"]
    vox_ml = abs(np.linalg.det(aff[:3, :3])) / 1000
    for s, task in zip(stats, BLOBS, strict=True):
        assert s["voxels"] == int(gt[task].sum())
        assert s["volume_ml"] == pytest.approx(gt[task].sum() * vox_ml)
        assert s["mean_intensity"] == pytest.approx(float(img[gt[task]].mean()))
        assert s["label_map_voxels"] == int((res.labels == s["label"]).sum())
    rows = written["statistics_csv"].read_text().splitlines()
    assert rows[0] == "label,task,voxels,volume_ml,mean_intensity,label_map_voxels"
    assert rows[1].startswith("1,left_blob,") and len(rows) == 3
    png = written["preview"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    pix = mpimg.imread(written["preview"])
    assert pix.shape[0] > 300 and pix.shape[1] > 900
    # label 2 (right_blob, on the darkest intensity) is overlaid in its legend colour
    from hermes.inference.preview import label_colors

    dark = 0.55 * label_colors(2)[1]
    assert (np.abs(pix[..., :3] - dark) < 0.03).all(-1).sum() > 50
    # nothing but our files, no temporary leftovers
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["labels.json", "labels.nii.gz", "preview.png", "probabilities",
                    "statistics.csv", "statistics.json", "structures"]
    # a second save replaces the first: its masks, maps and preview do not stay behind, files
    # that are not outputs of the first save do
    (tmp_path / "out" / "structures" / "manual_liver.nii.gz").write_bytes(b"user file")
    res.save(tmp_path / "out", preview=False)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["labels.json", "labels.nii.gz", "statistics.csv", "statistics.json",
                    "structures"]
    assert [p.name for p in (tmp_path / "out" / "structures").iterdir()] == ["manual_liver.nii.gz"]


def test_save_never_writes_over_the_input(tmp_path):
    aff, img, _ = _on_grid("ras")
    src = save_image(tmp_path / "labels.nii.gz", img, aff)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    res = _run(str(src), None)
    with pytest.raises(FileExistsError, match="would overwrite the input"):
        res.save(tmp_path, preview=False)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]
    written = res.save(tmp_path, preview=False, prefix="seg_")
    assert written["labels"].name == "seg_labels.nii.gz"


def test_save_leaves_files_it_did_not_write_alone(tmp_path):
    """Only a Hermes labels.json and a save marker's names of Hermes outputs inside the folder
    drive the removal of earlier outputs: a user's labels.json is refused (never replaced),
    marker entries outside the folder or behind a symbolic link are ignored."""
    from hermes.inference.result import save_marker

    aff, img, _ = _on_grid("ras")
    res = _run(img, aff)
    user = tmp_path / "user"
    (user / "structures").mkdir(parents=True)
    mine = {"labels.json": b'{"labels": {"1": "brain"}}', "preview.png": b"my picture",
            "structures/brain.nii.gz": b"my mask"}
    for name, data in mine.items():
        (user / name).write_bytes(data)
    with pytest.raises(FileExistsError, match="is not a Hermes save's labels.json"):
        res.save(user, preview=False)
    assert {n: (user / n).read_bytes() for n in mine} == mine
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    victims = [elsewhere / "thesis.tex", elsewhere / "sub" / "keep.nii.gz"]
    for v in victims:
        v.write_text("keep")
    res.save(out, preview=False)
    (out / "linked").symlink_to(elsewhere / "sub")
    (out / "structures").symlink_to(elsewhere / "sub")
    save_marker(out).write_text(json.dumps({"files": [
        str(victims[0]), "linked/keep.nii.gz", "structures/keep.nii.gz", "../elsewhere/x",
        "statistics.csv"]}))
    res.save(out, preview=False)
    assert all(v.read_text() == "keep" for v in victims)
    assert not save_marker(out).exists()


def test_one_save_at_a_time_and_temporaries_of_a_killed_save_removed(tmp_path):
    from hermes.files import FolderBusyError, folder_lock

    aff, img, _ = _on_grid("ras")
    res = _run(img, aff)
    res.save(tmp_path, preview=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with folder_lock(tmp_path), pytest.raises(FolderBusyError, match="output folder"):
        res.save(tmp_path, preview=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / ".labels.nii.gz.k3j9x0ab.tmp").write_bytes(b"half a file")
    res.save(tmp_path, preview=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_results_keep_the_input_nifti_header_geometry(tmp_path):
    """qform/sform and their codes (MNI 4, aligned 2) come back as in the input, also when the
    qform differs from the sform; the spatial unit is written as mm."""
    aff, img, gt = _on_grid("oblique")
    qform = aff.copy()
    qform[:3, 3] += 0.25  # a (slightly) different qform: the sform defines the grid
    nimg = nib.Nifti1Image(img, aff)
    nimg.set_qform(qform, code=2)
    nimg.set_sform(aff, code=4)
    nib.save(nimg, str(tmp_path / "in.nii.gz"))
    res = _run(str(tmp_path / "in.nii.gz"), None)
    np.testing.assert_array_equal(res.masks[0], gt["left_blob"])
    written = res.save(tmp_path / "out", per_structure=True, preview=False)
    for img_out in (res.label_image, res.mask_image("right_blob"),
                    nib.load(str(written["labels"])), nib.load(str(written["mask:left_blob"]))):
        q, qc = img_out.get_qform(coded=True)
        s, sc = img_out.get_sform(coded=True)
        assert (int(qc), int(sc)) == (2, 4)
        np.testing.assert_allclose(q, nimg.get_qform(), atol=1e-4)
        np.testing.assert_allclose(s, aff, atol=1e-5)
        assert img_out.header.get_xyzt_units()[0] == "mm"
    # arrays (and an affine override) get the plain header: both forms, code 1
    plain = _run(img, aff).label_image
    assert (int(plain.get_qform(coded=True)[1]), int(plain.get_sform(coded=True)[1])) == (1, 1)


def test_results_of_a_nifti_without_orientation_store_none(tmp_path):
    """qform and sform codes both 0 (no orientation in the file): the outputs store none
    either, so every reader places them where it places the input (nibabel: the same fallback
    affine from the voxel sizes; ITK: identity direction, origin 0), not a code-1 affine."""
    aff, img, _ = _on_grid("ras")
    nimg = nib.Nifti1Image(img, aff)
    nimg.set_qform(None, code=0)
    nimg.set_sform(None, code=0)
    nib.save(nimg, str(tmp_path / "in.nii.gz"))
    read_in = nib.load(str(tmp_path / "in.nii.gz"))
    res = _run(str(tmp_path / "in.nii.gz"), None)
    written = res.save(tmp_path / "out", per_structure=True, preview=False)
    for path in (written["labels"], written["mask:left_blob"]):
        out = nib.load(str(path))
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 0)
        assert out.header.get_zooms() == read_in.header.get_zooms()
        np.testing.assert_allclose(out.affine, read_in.affine, atol=1e-6)

def test_real_tiny_model_from_checkpoint(tmp_path):
    """A real network (random weights) saved and loaded by path: shapes, dtypes, geometry and
    the label/mask/probability consistency; auto modality with a random head is refused."""
    net = hm.build("tiny", tasks=TASKS, modalities=MODALITIES,
                   groups={"blobs": {"tasks": BLOBS, "modality": "T1"}})
    ckpt = tmp_path / "tiny.hermes"
    hm.save(net, ckpt, metadata={"preprocess": {"spacing": [3.0, 3.0, 3.0]},
                                 "train_config": {"crop_size": [32, 32, 32]}})
    linear, shape = np.diag([-2.0, 2.0, 2.5]), (40, 36, 30)
    aff = grid(linear, shape)
    img, _ = phantom(aff, shape)
    times: dict = {}
    clear_workspace()
    res = hermes.segment(img, tasks=None, modality="t1w", model=str(ckpt), device="cpu",
                         affine=aff, probabilities=True, threshold=0.5, timings=times)
    assert cached_bytes() == 0  # no accumulator memory kept after the call
    assert res.modality == "T1" and res.task_names == BLOBS
    assert res.settings["model_spacing"] == [3.0, 3.0, 3.0]
    assert res.settings["roi_size"] == [32, 32, 32]
    assert res.labels.dtype == np.uint8 and res.labels.shape == shape
    p = res.probabilities.astype(np.float32)
    clear = np.abs(p - 0.5) > 1e-3  # float16 storage rounds probabilities next to 0.5
    np.testing.assert_array_equal(res.masks[clear], p[clear] >= 0.5)
    assert set(times) >= {"load", "preprocess", "inference", "writeback", "total"}
    with pytest.raises(ModalityDetectionError, match="pass modality="):
        hermes.segment(img, model=str(ckpt), device="cpu", affine=aff, modality="auto",
                       modality_threshold=0.99)
    with pytest.raises(FileNotFoundError, match="missing.hermes"):
        hermes.segment(img, model=str(tmp_path / "missing.hermes"), affine=aff, modality="T1")


def test_default_model_missing_is_clear(monkeypatch, tmp_path):
    import hermes.models.default as dm

    monkeypatch.setattr(dm, "default_model_path", lambda: tmp_path / "default.hermes")
    with pytest.raises(dm.DefaultModelMissingError, match="embedded default model is missing"):
        dm.default_model()
    net = hm.build("tiny", tasks=TASKS, modalities=MODALITIES)
    hm.save(net, tmp_path / "default.hermes", metadata={"preprocess": {"spacing": [2, 2, 2]}})
    loaded = dm.default_model()
    assert loaded.vocab.tasks == TASKS
    assert loaded.hermes_metadata["preprocess"]["spacing"] == [2, 2, 2]


def _official_shaped(sd: dict) -> dict:
    """The fixture's official weights grown to the released Hermes-R table sizes (72 task rows
    + null, 6 modalities) by repeating rows, so the official vocabulary applies."""
    out = {}
    for k, v in sd.items():
        if k.endswith("task_prior"):
            rows = v[:-1].repeat(72 // (v.shape[0] - 1) + 1, 1)[:72]
            v = torch.cat([rows, v[-1:]])
        elif k.endswith("modality_prior"):
            v = torch.cat([v, v[:2]])
        elif k.startswith("mod_out.classifier.fc2"):
            v = torch.cat([v, v[:2]])
        out[k] = v
    return out


def test_official_checkpoint_path(tmp_path, official_fixture):
    """``model="official.pth"`` loads official weights with the 71-task vocabulary and segments
    a dataset group by name."""
    path = tmp_path / "hermes_r.pth"
    torch.save({"model_state_dict": _official_shaped(official_fixture["official_state_dict"])},
               path)
    linear, shape = np.diag([-2.0, -2.0, 2.5]), (40, 36, 30)
    aff = grid(linear, shape)
    img, _ = phantom(aff, shape)
    res = hermes.segment(img * 10 - 1000, tasks="kits", modality="CT", model=str(path),
                         device="cpu", affine=aff, roi_size=32, model_spacing=3.0)
    off = hm.official_vocabulary()
    assert res.task_names == off.group("kits") == ["kits/kidney", "kits/kidney_tumor"]
    assert res.labels.shape == img.shape and res.masks.shape == (2, *img.shape)
    assert res.model_source == str(path)


def test_arguments_and_inputs_the_api_used_to_mishandle(tmp_path):
    aff, img, _ = _on_grid("ras")
    ref = _run(img, aff)
    path = save_image(tmp_path / "img.nii.gz", img, aff)
    # a file's geometry is its header's: affine=/spacing= refused, not silently ignored
    for kw in ({"affine": np.eye(4)}, {"spacing": 2.0}):
        with pytest.raises(SegmentationInputError, match="array input"):
            hermes.segment(str(path), modality="T1", tasks=BLOBS, model=oracle_model(), **kw)
    with pytest.raises(SegmentationInputError, match="spacing= .* nibabel"):
        hermes.segment(nib.load(str(path)), modality="T1", tasks=BLOBS, model=oracle_model(),
                       spacing=2.0)
    with pytest.raises(SegmentationInputError, match="1 or 3 values"):
        _run(img, None, spacing=(1.5, 1.5))
    folder = tmp_path / "folder"
    folder.mkdir()
    save_image(folder / "a.nii.gz", img, aff)
    with pytest.raises(SegmentationInputError, match="no DICOM series but image files"):
        _run(str(folder), None)
    (folder / "a.nii.gz").unlink()
    (folder / "sub").mkdir()  # nothing but a subfolder: not searched, said so
    with pytest.raises(SegmentationInputError, match="holds no files .* not its subfolders"):
        _run(str(folder), None)
    two = hm.build("tiny", tasks=["x"], modalities=["T1"], in_channels=2)
    with pytest.raises(SegmentationInputError, match=r"has 40 channels, the model expects 2; "
                                                    r"shape \(2, 40, 40, 40\) looks channel-first"):
        hermes.segment(np.zeros((2, 40, 40, 40), np.float32) + np.arange(40), modality="T1",
                       model=two, spacing=2.0, device="cpu")
    # bfloat16 tensors (no NumPy dtype) are read as float32
    bf = _run(torch.from_numpy(img).bfloat16(), aff)
    np.testing.assert_array_equal(bf.labels, _run(torch.from_numpy(img).bfloat16().float(),
                                                  aff).labels)
    # device names as users type them; argument types and ranges checked before inference
    np.testing.assert_array_equal(_run(img, aff, device="CPU").labels, ref.labels)
    with pytest.raises(SegmentationInputError, match="device must be"):
        _run(img, aff, device="gpu")
    with pytest.raises(ValueError, match="threshold"):
        _run(img, aff, threshold="0.5")
    for roi in (0, (48, 48)):
        with pytest.raises(ValueError, match="roi_size"):
            _run(img, aff, roi_size=roi)
    for ml in (-5, float("inf"), float("nan")):
        with pytest.raises(ValueError,
                           match=r"min_volume_ml \(--min-volume-ml\) must be a volume >= 0 mL"):
            _run(img, aff, postprocess={"min_volume_ml": ml})
    for name in ("tta", "fast", "probabilities"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            _run(img, aff, **{name: "no"})
    for tasks, what in (([1], "got 1 \\(int\\)"), (5, "got int 5")):
        with pytest.raises(SegmentationInputError, match=f"tasks must be task names.*{what}"):
            _run(img, aff, tasks=tasks)
    with pytest.raises(SegmentationInputError, match="array of complex64 values: .*np.abs"):
        _run(img.astype(np.complex64), aff)
    with pytest.raises(SegmentationInputError, match=r"shape \(\d+,\) is 1-D"):
        _run(img[:, 0, 0], aff)
    with pytest.raises(SegmentationInputError, match="looks channel-first"):
        _run(np.stack([img] * 3), aff)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sw_batch_size must be a positive int"):
            _run(img, aff, sw_batch_size=bad)
    # windows per forward: 1 on the CPU, 2 on GPUs unless given
    assert ref.settings["sw_batch_size"] == 1
    assert _run(img, aff, sw_batch_size=np.int64(3)).settings["sw_batch_size"] == 3
    assert resolve_sw_batch(None, torch.device("cuda", 1)) == DEFAULT_SW_BATCH["cuda"] == 2
    # a model in another dtype gets its inputs in that dtype (raised "expected scalar type")
    for dtype in (torch.float64, torch.bfloat16):
        np.testing.assert_array_equal(_run(img, aff, model=oracle_model().to(dtype)).labels,
                                      ref.labels)
    # names in a list are stripped as in the comma-separated form
    assert _run(img, aff, tasks=[" left_blob", "right_blob "]).task_names == list(BLOBS)
    # the user's model keeps its modes (and device)
    net = oracle_model().train()
    first = next(net.children()).eval()
    _run(img, aff, model=net, threshold=torch.tensor(0.5))
    assert net.training and not first.training


def test_tasks_of_another_modality_are_warned_about():
    import warnings

    vocab = oracle_model().vocab  # the blobs are T1 tasks, liver a CT task
    with pytest.warns(UserWarning, match=r"other modalities than T1: liver \(CT\)"):
        assert resolve_tasks(vocab, ["left_blob", "liver"], "T1") == ["left_blob", "liver"]
    # a task also in a group without a recorded modality: no warning
    mixed = hm.build("tiny", tasks=TASKS, modalities=MODALITIES, groups={
        "mixed": {"tasks": ["liver"]}, "ct": {"tasks": ["liver"], "modality": "CT"}}).vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_tasks(mixed, ["liver"], "T1") == ["liver"]


def test_save_with_colliding_names_and_many_tasks(tmp_path, monkeypatch):
    from hermes.inference.result import SegmentationResult, unique_filenames

    assert unique_filenames(["a/b", "a_b", "A b", "c"]) == ["a_b", "a_b_2", "A_b_3", "c"]
    names = ["kidney/left", "kidney_left"] + [f"structure_{i}" for i in range(83)]
    shape = (12, 10, 8)
    masks = np.zeros((len(names), *shape), bool)
    for i in range(len(names)):
        masks[i].flat[i] = True
    labels = np.zeros(shape, np.uint8)
    for i in range(len(names)):
        labels[masks[i]] = i + 1
    res = SegmentationResult(label_map=labels, masks=masks, task_names=names,
                             affine=np.diag([2.0, 2.0, 2.0, 1.0]), modality="CT",
                             image=np.random.default_rng(0).random(shape, np.float32))
    written = res.save(tmp_path / "o", per_structure=True)  # 85 tasks: the preview draws
    assert written["preview"].read_bytes()[:4] == b"\x89PNG"
    first, second = written["mask:kidney/left"], written["mask:kidney_left"]
    assert first != second
    assert load_image(first)[0].astype(bool).sum() == 1
    assert load_image(second)[0].astype(bool).flat[1]
    # a second save finds the first's files by the same names
    res.save(tmp_path / "o", preview=False)
    assert not (tmp_path / "o" / "structures").exists()
    # a preview that fails to draw is a warning; the earlier preview does not stay behind
    res.save(tmp_path / "p")
    assert (tmp_path / "p" / "preview.png").exists()
    import hermes.inference.preview as preview

    def broken(result):
        raise ValueError("cannot draw")

    monkeypatch.setattr(preview, "preview_png", broken)
    with pytest.warns(UserWarning, match="preview.png not written: ValueError: cannot draw"):
        written = res.save(tmp_path / "p")
    assert "preview" not in written and not (tmp_path / "p" / "preview.png").exists()


def test_thin_slabs_are_warned_about():
    """A few slices padded on both sides within the window (here 6 of a 32-voxel window, at the
    model's 1.5 mm) get a warning naming the axis; a volume spanning the window does not."""
    rng = np.random.default_rng(2)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    thin = rng.uniform(1, 2, (40, 40, 6)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"spans only 6 voxels \(9 mm\) inferior-superior "
                                         r"against a 32-voxel window") as record:
        _run(thin, aff)
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(rng.uniform(1, 2, (40, 40, 12)).astype(np.float32), aff)


@pytest.mark.parametrize("linear, spacing", BACK_MAPPING_GRIDS)
def test_masks_mapped_back_in_their_box_equal_the_whole_mapping(linear, spacing):
    """``BackMapper.threshold_box`` computes only the box that can reach the threshold: its
    masks equal thresholding the whole mapped array, to the voxel, also for probabilities one
    float32 step either side of the threshold and for hits on the model grid's faces."""
    from scipy import ndimage

    from hermes.inference.masks import TaskMasks

    model_shape, back = back_mapper(linear, spacing)
    for seed in range(6):
        g = np.random.default_rng(seed)
        field = ndimage.gaussian_filter(g.standard_normal(model_shape), 2.0)
        probs = (1 / (1 + np.exp(-(field / field.std() * 3 - 3 + seed)))).astype(np.float32)
        near = g.random(probs.shape) < 0.02
        probs[near] = np.float32(0.5) + g.choice([-1, 0, 1], near.sum()) * np.float32(6e-8)
        if seed == 5:
            probs[...] = 0.0
            probs[0, :2, -1] = 0.9  # on the faces of the model grid only
        for threshold in (0.5, 0.3):
            want = back(probs, order=1) >= threshold
            box, crop = back.threshold_box(probs, threshold)
            masks = TaskMasks(back.orig_shape)
            masks.append(crop, box)
            np.testing.assert_array_equal(masks[0], want, err_msg=f"{seed} {threshold}")
            if want.any():
                assert masks.box(0)[1].size < want.size  # a box, not the grid
    assert back.threshold_box(np.zeros(model_shape, np.float32), 0.5) == (None, None)


def test_task_masks_keep_crops_and_give_dense_masks():
    from hermes.inference.masks import TaskMasks, bounding_box

    rng = np.random.default_rng(0)
    dense = np.zeros((3, 20, 16, 12), bool)
    dense[0, 3:7, 2:9, 5] = rng.random((4, 7)) > 0.3
    dense[0, 3, 2, 5] = dense[0, 6, 8, 5] = True
    dense[2] = True
    masks = TaskMasks.from_dense(dense)
    assert masks.shape == dense.shape and len(masks) == 3
    np.testing.assert_array_equal(np.asarray(masks), dense)
    for t in range(3):
        np.testing.assert_array_equal(masks[t], dense[t])
        assert masks.count(t) == dense[t].sum()
    assert masks.box(0)[0] == (slice(3, 7), slice(2, 9), slice(5, 6)) and masks.box(1) is None
    assert bounding_box(dense[1]) is None and masks.nbytes == 4 * 7 + dense[2].size
    np.testing.assert_array_equal(masks[:, 4], dense[:, 4])  # other indices: the dense stack
    np.testing.assert_array_equal(masks[-1], dense[2])
    with pytest.raises(ValueError, match="does not fill its box"):
        masks.append(np.ones((2, 2, 2), bool), (slice(0, 2), slice(0, 3), slice(0, 2)))


def test_saving_refuses_to_overwrite_any_channel_file_and_records_the_model_path(tmp_path,
                                                                                 monkeypatch):
    """A multi-file input is protected file by file (its description is no path), and the
    model is recorded by its absolute path (``--resume`` compares it from any folder)."""
    two = hm.build("tiny", tasks=["x"], modalities=["T1"], in_channels=2)
    model = tmp_path / "two.hermes"
    hm.save(two, model, metadata={"preprocess": {"spacing": [6.0, 6.0, 6.0]},
                                  "train_config": {"crop_size": [32, 32, 32]}})
    aff = grid(np.diag([2.0, 2.0, 3.0]), (36, 36, 24))
    img, _ = phantom(aff, (36, 36, 24))
    first = save_image(tmp_path / "out" / "labels.nii.gz", img + 100, aff)  # an input there
    second = save_image(tmp_path / "ch1.nii.gz", img * 2 + 7, aff)
    monkeypatch.chdir(tmp_path)
    res = hermes.segment([str(first), str(second)], model="two.hermes", modality="T1",
                         device="cpu", fast=True)
    assert res.model_source == str(model.resolve())
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="would overwrite the input .*labels.nii.gz"):
        res.save(tmp_path / "out")
    assert first.read_bytes() == before


def test_save_streams_gzip_and_writes_in_threads(tmp_path, monkeypatch):
    import gzip

    import hermes.inference.result as result_mod
    from hermes.inference.result import SegmentationResult, nifti_bytes, nifti_image, save_threads

    rng = np.random.default_rng(3)
    aff = np.array([[0.8, 0.1, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 3], [0, 0, 0, 1.0]])
    for arr in ((rng.random((31, 23, 17)) > 0.7).astype(np.uint8),
                np.asfortranarray(rng.integers(0, 9, (20, 21, 5)).astype(np.uint8)),
                rng.random((9, 8, 7)).astype(np.float32)):
        # the streamed .nii.gz holds exactly nibabel's file
        assert gzip.decompress(nifti_bytes(arr, aff)) == nifti_image(arr, aff).to_bytes()
    assert save_threads(40, 1 << 40) == 1 and save_threads(1, 1) == 1
    assert 1 <= save_threads(40, 1) <= result_mod.SAVE_THREADS

    names = [f"s{i}" for i in range(9)]
    shape = (14, 12, 10)
    masks = np.zeros((len(names), *shape), bool)
    for i in range(len(names)):
        masks[i, i:i + 4, 2:2 + i, 1:8] = True
    labels = np.zeros(shape, np.uint8)
    for i in range(len(names)):
        labels[masks[i]] = i + 1
    res = SegmentationResult(label_map=labels, masks=masks, task_names=names, affine=aff)
    files = {}
    for threads in (1, 4):
        monkeypatch.setattr(result_mod, "save_threads", lambda files, scratch, n=threads: n)
        written = res.save(tmp_path / f"t{threads}", per_structure=True, preview=False)
        files[threads] = {k: p.read_bytes() for k, p in written.items()}
    assert files[1] == files[4]
    for i, name in enumerate(names):
        mask, _ = load_image(tmp_path / "t4" / "structures" / f"{name}.nii.gz")
        np.testing.assert_array_equal(mask.astype(bool), masks[i])

    # a file that fails: the error comes out, the save is left unfinished (no labels.json, its
    # marker kept), no temporary file stays behind
    def broken(self, index, geo):
        if index == 5:
            raise OSError("disk full")
        return nifti_bytes(np.asarray(self.masks[index]).astype(np.uint8), self.affine)

    monkeypatch.setattr(SegmentationResult, "_mask_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        res.save(tmp_path / "bad", per_structure=True, preview=False)
    left = {p.name for p in (tmp_path / "bad").rglob("*")}
    assert "labels.json" not in left and ".hermes-saving.json" in left
    assert not [n for n in left if n.endswith(".tmp")]


def test_a_bare_name_means_the_one_dataset_task_of_that_name():
    """``--tasks head`` for the embedded model's ``invesalius_head_ct/head``; a name several
    datasets keep apart is refused, naming them."""
    from hermes.inference.segment import resolve_tasks
    from hermes.models import UnknownNameError

    net = hm.build("tiny", tasks=["a/head", "b/head", "c/liver", "liver2"], modalities=["CT"])
    assert resolve_tasks(net.vocab, "liver,liver2", "CT") == ["c/liver", "liver2"]
    with pytest.raises(UnknownNameError, match="'head' is ambiguous: a/head, b/head"):
        resolve_tasks(net.vocab, "head", "CT")
    with pytest.raises(UnknownNameError, match="unknown task 'kidney'"):
        resolve_tasks(net.vocab, "kidney", "CT")


def test_min_volume_in_voxels_is_not_rounded_up_past_an_exact_count():
    from hermes.inference.segment import min_voxels

    voxel = 0.3 ** 3 / 1000  # mL
    assert 0.0189 / voxel > 700  # the float quotient: a component of 700 voxels would go
    assert min_voxels(0.0189, voxel) == 700
    assert min_voxels(0.01891, voxel) == 701 and min_voxels(0.0, voxel) == 0
