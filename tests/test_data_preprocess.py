"""Preprocessing: geometry against nibabel oracles, normalisation by hand, the case cache."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import hermes.data as hd
from hermes.data.geometry import (
    crop,
    nonzero_bbox,
    reorient,
    resample,
    resampled_grid,
    separable_resample,
)
from hermes.data.io import load_image
from hermes.data.normalize import NormalizationSpec, normalization_for, normalize
from hermes.data.preprocess import PreprocessError
from hermes.data.synthetic import generate_collection


# ------------------------------------------------------------------ geometry
def _random_affine(rng):
    perm = rng.permutation(3)
    a = np.eye(4)
    a[:3, :3] = 0
    for i in range(3):
        a[perm[i], i] = rng.choice([-1, 1]) * rng.uniform(0.5, 3)
    a[:3, 3] = rng.uniform(-50, 50, 3)
    return a


def test_reorient_matches_nibabel_closest_canonical():
    rng = np.random.default_rng(0)
    for _ in range(6):
        aff = _random_affine(rng)
        data = rng.random((4, 5, 6)).astype(np.float32)
        oracle = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
        arr, new_aff = reorient(data, aff)
        np.testing.assert_array_equal(arr, oracle.get_fdata())
        np.testing.assert_allclose(new_aff, oracle.affine)
        assert nib.aff2axcodes(new_aff) == ("R", "A", "S")
        chans, aff_c = reorient(np.stack([data, 2 * data]), aff, channel_first=True)
        np.testing.assert_array_equal(chans[1], 2 * oracle.get_fdata())


def test_resampled_grid_by_hand():
    # 10 voxels at 1 mm -> 2 mm: 5 voxels at old indices 0.5, 2.5, ..., 8.5 (same centre)
    shape, aff, step, off = resampled_grid((10, 4, 3), np.eye(4), (2.0, 1.0, 0.5))
    assert shape == (5, 4, 6)
    np.testing.assert_allclose(step, [2, 1, 0.5])
    np.testing.assert_allclose(off, [0.5, 0, -0.25])
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [0.5, 0, -0.25, 1])
    np.testing.assert_allclose(np.diag(aff)[:3], [2, 1, 0.5])


def test_linear_resampling_of_a_linear_field_is_exact():
    # f(world) = a . world + b is reproduced exactly by (tri)linear interpolation inside the FOV
    aff = np.diag([0.7, 1.3, 4.0, 1.0])
    aff[:3, 3] = [10, -20, 5]
    shape = (30, 20, 8)
    idx = np.indices(shape).reshape(3, -1)
    world = aff[:3, :3] @ idx + aff[:3, 3:4]
    a, b = np.array([0.5, -1.0, 2.0]), 3.0
    f = (a @ world + b).reshape(shape).astype(np.float32)
    for order in (1, 3):  # order 3 + anisotropy: the coarse axis is linear
        out, new_aff = resample(f[None], aff, 1.5, order=order)
        nidx = np.indices(out.shape[1:]).reshape(3, -1)
        nworld = new_aff[:3, :3] @ nidx + new_aff[:3, 3:4]
        expect = (a @ nworld + b).reshape(out.shape[1:])
        old_idx = (nworld - aff[:3, 3:4]) / np.diag(aff)[:3, None]
        # cubic splines: boundary effects decay inwards; the thick-slice axis z is linear
        margin = np.array([0, 0, 0] if order == 1 else [5, 5, 0])[:, None]
        inside = np.all((old_idx >= margin) & (old_idx <= np.array(shape)[:, None] - 1 - margin),
                        0).reshape(out.shape[1:])
        assert inside.sum() > 500
        np.testing.assert_allclose(out[0][inside], expect[inside], atol=1e-3)
        np.testing.assert_allclose(hd.io.spacing_from_affine(new_aff), [1.5] * 3)


def test_label_resampling_is_nearest_and_keeps_dtype():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:8, 2:8, 2:8] = 3
    lab[4:6, 4:6, 4:6] = 9
    out, _ = resample(lab, np.eye(4), 0.5, order=0, channel_first=False)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 3, 9}
    # nearest at 2x upsampling: each value covers 8x its voxels (up to the border)
    assert (out == 9).sum() == 8 * 8


@pytest.mark.parametrize("spacing,order", [((0.8, 0.9, 4.0), 3), ((1.1, 0.7, 1.3), 3),
                                           ((1.1, 0.7, 1.3), 1)])
def test_channels_resample_each_as_alone(spacing, order, monkeypatch):
    """Channels written into one preallocated array (the anisotropic path's second, linear pass
    included), in slabs: each equals the channel resampled alone, and integer labels keep their
    dtype at order 0."""
    from hermes.data import geometry

    rng = np.random.default_rng(4)
    img = rng.normal(0, 1, (3, 23, 19, 11)).astype(np.float32)
    aff = np.diag([*spacing, 1.0])
    out, _ = resample(img, aff, 1.5, order=order)
    monkeypatch.setattr(geometry, "SLAB_BYTES", 200)
    for c in range(3):
        alone, _ = resample(img[c], aff, 1.5, order=order, channel_first=False)
        np.testing.assert_array_equal(out[c], alone)
    lab = rng.integers(0, 300, (2, 23, 19, 11)).astype(np.int16)
    out_lab, _ = resample(lab, aff, 1.5, order=0)
    assert out_lab.dtype == np.int16 and out_lab.shape[1:] == out.shape[1:]
    assert set(np.unique(out_lab)) <= set(np.unique(lab))


def test_prepare_arrays_refuses_a_label_on_another_grid():
    from hermes.data.preprocess import PreprocessParams, prepare_arrays

    img = np.ones((1, 10, 10, 8), np.float32)
    img[0, 2:5] = 3
    for crop_nonzero in (True, False):
        with pytest.raises(ValueError, match=r"label shape \(10, 10, 6\) does not match .*"
                                             r"\(10, 10, 8\)"):
            prepare_arrays(img, np.eye(4), "CT",
                           PreprocessParams(1.0, 1, crop_nonzero=crop_nonzero),
                           np.zeros((10, 10, 6), np.uint8))


def test_nonzero_bbox_and_crop():
    m = np.zeros((6, 7, 8), bool)
    m[1, 2, 3] = m[4, 5, 3] = True
    bbox = nonzero_bbox(m)
    assert bbox == ((1, 5), (2, 6), (3, 4))
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    arr, caff = crop(np.arange(6 * 7 * 8).reshape(6, 7, 8), aff, bbox)
    assert arr.shape == (4, 4, 1) and arr[0, 0, 0] == 1 * 56 + 2 * 8 + 3
    np.testing.assert_allclose(caff[:3, 3], [2, 6, 12])
    assert nonzero_bbox(np.zeros((2, 3, 4), bool)) == ((0, 2), (0, 3), (0, 4))


# ------------------------------------------------------------------ normalisation
def test_ct_normalisation_by_hand():
    x = np.array([-2000.0, -1000, 0, 100, 3000], np.float32).reshape(1, 5, 1, 1)
    out, stats = normalize(x, NormalizationSpec("ct", clip=(-1000, 1000), body_threshold=-500))
    # clip -> [-1000, -1000, 0, 100, 1000]; body voxels (> -500): 0, 100, 1000
    body = np.array([0, 100, 1000.0])
    expect = (np.array([-1000, -1000, 0, 100, 1000]) - body.mean()) / body.std()
    np.testing.assert_allclose(out.ravel(), expect, rtol=1e-5)
    assert stats[0]["clip"] == [-1000, 1000]


def test_percentile_normalisation_uses_nonzero_voxels():
    rng = np.random.default_rng(0)
    x = np.zeros((1, 20, 20, 20), np.float32)
    x[0, 5:15, 5:15, 5:15] = rng.normal(500, 50, (10, 10, 10))
    x[0, 6, 6, 6] = 1e6  # outlier, clipped at the 99.5th percentile
    out, stats = normalize(x, normalization_for("T1"))
    nz = x[0] != 0
    lo, hi = np.percentile(x[0][nz], [0.5, 99.5])
    clipped = np.clip(x[0], lo, hi)
    expect = (clipped - clipped[nz].mean()) / clipped[nz].std()
    np.testing.assert_allclose(out[0], expect, rtol=1e-4, atol=1e-4)
    assert abs(out[0][nz].mean()) < 1e-4 and abs(out[0][nz].std() - 1) < 1e-4


@pytest.mark.parametrize("modality,dtype", [("CT", np.int16), ("T1", np.float32),
                                             ("PET", np.float64)])
def test_normalisation_in_slabs_leaves_the_input_alone(modality, dtype, monkeypatch):
    from hermes.data import normalize as norm

    rng = np.random.default_rng(5)
    x = (rng.normal(0, 1, (2, 13, 11, 7)) * (400 if modality == "CT" else 90)).astype(dtype)
    x[:, :3] = 0
    before = x.copy()
    whole, stats = normalize(x, normalization_for(modality))
    monkeypatch.setattr(norm, "_STATS_SLAB", 37)  # statistics summed over 28 slabs per channel
    slabs, stats_slabs = normalize(x, normalization_for(modality))
    np.testing.assert_array_equal(x, before)
    assert whole.dtype == np.float32
    for c in range(2):
        v = x[c].astype(np.float32)  # clipped in float32, statistics in float64
        sel = v > -500 if modality == "CT" else v != 0
        lo, hi = stats[c]["clip"]
        clipped = np.clip(v, np.float32(lo), np.float32(hi)).astype(np.float64)
        mean, std = clipped[sel].mean(), clipped[sel].std()
        for got, st in ((whole, stats), (slabs, stats_slabs)):
            assert st[c]["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-9)
            assert st[c]["std"] == pytest.approx(std, rel=1e-12)
            np.testing.assert_allclose(got[c], (clipped - mean) / std, rtol=1e-5, atol=1e-5)


def test_normalisation_overrides():
    s = normalization_for("CT", {"ct": {"clip": [-200, 300]}})
    assert s.kind == "ct" and s.clip == (-200, 300)
    assert normalization_for("PET", {"PET": {"percentiles": [1, 99]}}).percentiles == (1, 99)
    with pytest.raises(ValueError, match="unknown key 'window'"):
        normalization_for("CT", {"CT": {"window": 3}})
    # aliases name the modality; a clip window for MRI keeps the non-zero statistics
    t1 = normalization_for("T1", {"T1w": {"clip": [0, 600]}})
    assert t1.kind == "window" and t1.clip == (0, 600)


def test_per_channel_normalisation_of_a_pet_ct_image():
    """``{PET: [CT, PET]}``: channel 0 of PET images as CT (HU window, body statistics),
    channel 1 as PET (percentiles); each against the one-channel normalisation by hand."""
    rng = np.random.default_rng(2)
    ct = rng.normal(0, 400, (12, 10, 8)).astype(np.float32)
    pet = np.abs(rng.normal(0, 3, (12, 10, 8))).astype(np.float32)
    spec = normalization_for("PET", {"PET": ["CT", {"percentiles": [1, 99]}],
                                     "CT": {"clip": [-500, 500]}})
    assert [s.kind for s in spec] == ["ct", "percentile"]
    assert spec[0].clip == (-500, 500) and spec[1].percentiles == (1, 99)
    out, stats = normalize(np.stack([ct, pet]), spec)
    np.testing.assert_allclose(out[0], normalize(ct[None], spec[0])[0][0], rtol=1e-6)
    np.testing.assert_allclose(out[1], normalize(pet[None], spec[1])[0][0], rtol=1e-6)
    assert stats[0]["clip"] == [-500, 500]
    with pytest.raises(ValueError, match="gives 2 channels their own settings, the image has 3"):
        normalize(np.stack([ct, pet, pet]), spec)
    with pytest.raises(ValueError, match="channel 1: expected a modality name or a mapping"):
        normalization_for("PET", {"PET": ["CT", 3]})
    from hermes.data.preprocess import PreprocessParams

    params = PreprocessParams(1.5, 1, "float32", 0, True, {"PET": ["CT", "PET"]})
    assert params.case_hash("PET") != PreprocessParams(1.5, 1, "float32", 0, True,
                                                       None).case_hash("PET")

def test_narrow_ct_window_keeps_the_body_mask_of_raw_hu():
    # air at -1000 must not become "body" because the window clips it to -200
    x = np.array([-1000.0, -1000, 0, 100, 400], np.float32).reshape(1, 5, 1, 1)
    out, stats = normalize(x, normalization_for("CT", {"CT": {"clip": [-200, 300]}}))
    clipped = np.array([-200, -200, 0, 100, 300.0])
    body = clipped[2:]
    np.testing.assert_allclose(out.ravel(), (clipped - body.mean()) / body.std(), rtol=1e-5)


def test_mri_window_uses_nonzero_voxels():
    x = np.array([0.0, 0, 200, 400, 900], np.float32).reshape(1, 5, 1, 1)
    out, _ = normalize(x, normalization_for("T2", {"T2": {"clip": [0, 600]}}))
    clipped = np.array([0, 0, 200, 400, 600.0])
    nz = clipped[2:]
    np.testing.assert_allclose(out.ravel(), (clipped - nz.mean()) / nz.std(), rtol=1e-5)


# ------------------------------------------------------------------ cache
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    return generate_collection(root, seed=11, cases_per_dataset=2, size=(16, 20),
                               predefined_test=1)


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def test_preprocess_cache_geometry_and_resume(synth, tmp_path):
    src_digest = {d: _tree_digest(synth.parent / d) for d in
                  ("synth_ct", "synth_t1", "synth_t2", "synth_pet")}
    cache = tmp_path / "cache"
    pc = hd.preprocess(synth, cache_dir=cache, spacing=6.0, workers=2, progress=False,
                       max_fg_samples=50)
    assert len(pc) == 8 and pc.tasks == hd.load_collection(synth).tasks
    assert pc.modalities == ["CT", "PET", "T1", "T2", "CINE"]
    for d in src_digest:  # sources untouched
        assert _tree_digest(synth.parent / d) == src_digest[d]
    for case in pc.cases:
        img, lab = case.image, case.label
        assert isinstance(img, np.memmap) and img.dtype == np.float32 and img.ndim == 4
        assert lab.dtype == np.uint8 and img.shape[1:] == lab.shape == case.shape
        assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
        np.testing.assert_allclose(case.spacing, [6.0] * 3, rtol=1e-6)
        # world-space centroid of each structure is preserved (oracle: source file + affine)
        src_lab, src_aff = load_image(
            next(c for c in hd.load_collection(synth).cases() if c.key == case.key).label)
        for v in case.present_values:
            n_src = (src_lab == v).sum()
            if n_src < 30:
                continue
            c_src = src_aff[:3, :3] @ np.argwhere(src_lab == v).mean(0) + src_aff[:3, 3]
            c_new = case.affine[:3, :3] @ np.argwhere(lab == v).mean(0) + case.affine[:3, 3]
            assert np.linalg.norm(c_src - c_new) < 6.0, (case.key, v)
        # foreground samples are real voxels of their value
        for v, coords in case.foreground.items():
            assert len(coords) <= 50 and np.all(lab[tuple(coords.T)] == v)
        assert case.meta["original"]["affine"] is not None
        assert abs(float(np.mean(img[0][lab > 0]))) < 5  # z-scored
    # splits stored and exposed; predefined test cases honoured
    assert [c.case_id for c in pc.split("test", "synth_ct")] == ["synth_ct_001"]
    assert {c.key for s in ("train", "val", "test") for c in pc.split(s)} == {
        c.key for c in pc.cases}

    # resume: nothing recomputed; a damaged case is redone
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    victim = cache / "synth_t1" / "synth_t1_000_image.npy"
    victim.write_bytes(victim.read_bytes()[:-100])
    pc2 = hd.preprocess(synth, cache_dir=cache, spacing=6.0, workers=1, progress=False,
                        max_fg_samples=50)
    stats = json.loads((cache / "collection.json").read_text())["stats"]
    assert stats["done"] == 1 and stats["skipped"] == 7
    for p, t in stamps.items():
        if not p.name.startswith("synth_t1_000"):
            assert p.stat().st_mtime_ns == t, p
    assert pc2.case("synth_t1/synth_t1_000").image.shape[0] == 1

    # other parameters on the same cache are refused
    with pytest.raises(PreprocessError, match="different parameters.*spacing"):
        hd.preprocess(synth, cache_dir=cache, spacing=5.0, progress=False)
    # no leftover temporary files
    assert not list(cache.rglob(".*tmp*"))


def test_cached_case_api(synth, tmp_path):
    pc = hd.preprocess(synth, cache_dir=tmp_path / "c16", spacing=8.0, workers=1,
                       progress=False, dtype="float16", image_order=1)
    case = pc.case("synth_pet/synth_pet_000")
    assert case.image.dtype == np.float16
    info = pc.datasets["synth_pet"]
    assert info.tasks == ("kidney", "bladder", "synth_pet/lesion")
    assert [pc.tasks[i] for i in info.task_indices] == list(info.tasks)
    assert pc.modalities[info.modality_index] == "PET"
    t = case.task_targets()
    assert t.shape == (3, *case.shape) and t.dtype == bool
    np.testing.assert_array_equal(t[1], np.asarray(case.label) == 2)
    # crop with padding outside the volume
    img, lab = case.crop((-2, 0, 0), (4, 3, 2))
    pad = float(np.asarray(case.image, np.float32).min())  # default pad: the image minimum
    assert img.shape == (1, 4, 3, 2) and np.all(img[:, :2] == pad)
    assert np.all(case.crop((-2, 0, 0), (4, 3, 2), image_pad=0.0)[0][:, :2] == 0)
    np.testing.assert_array_equal(lab[2:], case.label[:2, :3, :2])
    np.testing.assert_array_equal(img[0, 2:], case.image[0, :2, :3, :2].astype(np.float32))
    # pickles without the arrays (cheap to send to DataLoader workers)
    _ = case.image
    blob = pickle.dumps(case)
    assert len(blob) < case.image.nbytes or case.image.nbytes < 4096
    np.testing.assert_array_equal(pickle.loads(blob).label, case.label)
    assert sum(pc.sampling_weights.values()) == pytest.approx(1.0)
    assert pc.groups["synth_t1"]["tasks"] == ["liver", "spleen"]


def test_preprocess_refuses_cache_inside_sources_and_reports_problems(synth, tmp_path):
    with pytest.raises(PreprocessError, match="inside the source folder"):
        hd.preprocess(synth, cache_dir=synth.parent / "synth_ct" / "cache", progress=False)
    # the cache would hold <cache>/synth_ct: the dataset's own folder
    with pytest.raises(PreprocessError, match="would write dataset 'synth_ct' into its source"):
        hd.preprocess(synth, cache_dir=synth.parent, progress=False)
    shutil.copytree(synth.parent, tmp_path / "s")
    (tmp_path / "s" / "synth_t1" / "labelsTr" / "synth_t1_001.nii.gz").unlink()
    with pytest.raises(hd.CollectionError, match="synth_t1"):
        hd.preprocess(tmp_path / "s" / "collection.yaml", progress=False)
    assert not list((tmp_path / "s").glob("hermes_cache*"))


def test_default_cache_next_to_yaml(synth, tmp_path):
    """hermes_cache_<YAML name>/ beside the YAML; a hermes_cache/ of earlier versions that
    holds this collection goes on being used."""
    shutil.copytree(synth.parent, tmp_path / "s")
    kw = dict(spacing=10.0, workers=1, progress=False)
    pc = hd.preprocess(tmp_path / "s" / "collection.yaml", **kw)
    assert pc.cache_dir == (tmp_path / "s" / "hermes_cache_collection").resolve()
    pc.cache_dir.rename(tmp_path / "s" / "hermes_cache")
    pc = hd.preprocess(tmp_path / "s" / "collection.yaml", **kw)
    assert pc.cache_dir == (tmp_path / "s" / "hermes_cache").resolve()
    stats = json.loads((pc.cache_dir / "collection.json").read_text())["stats"]
    assert stats["done"] == 0  # found, not preprocessed again


def test_failed_case_is_reported_and_the_rest_resumes(synth, tmp_path):
    shutil.copytree(synth.parent, tmp_path / "s")
    bad = tmp_path / "s" / "synth_pet" / "imagesTr" / "synth_pet_001.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated gzip
    y = tmp_path / "s" / "collection.yaml"
    with pytest.raises(PreprocessError, match=r"1 case\(s\) failed[\s\S]*synth_pet_001"):
        hd.preprocess(y, cache_dir=tmp_path / "c", spacing=10.0, workers=1, progress=False,
                      validate=False)
    assert not (tmp_path / "c" / "collection.json").exists()
    assert len(list((tmp_path / "c").rglob("*_label.npy"))) == 7
    bad.write_bytes(good)
    hd.preprocess(y, cache_dir=tmp_path / "c", spacing=10.0, workers=1, progress=False)
    stats = json.loads((tmp_path / "c" / "collection.json").read_text())["stats"]
    assert stats == {**stats, "done": 1, "skipped": 7, "failed": 0}


def test_two_collections_do_not_share_a_cache(synth, tmp_path):
    """Two YAMLs next to each other get caches of their own by default; given one cache, the
    second is refused (it would replace the first's collection.json, and training would take
    whichever ran last); the same collection re-run, moved or rebuilt in Python is not."""
    import shutil

    import yaml

    from hermes.data.preprocess import PreprocessError

    root = tmp_path / "proj"
    shutil.copytree(synth.parent, root)
    first = root / "collection.yaml"
    second = root / "abdomen.yaml"
    cfg = yaml.safe_load(first.read_text())
    cfg["name"], cfg["datasets"], cfg["shared_tasks"] = "abdomen", cfg["datasets"][:1], []
    second.write_text(yaml.safe_dump(cfg))
    kw = dict(spacing=10.0, workers=1, progress=False)
    assert hd.preprocess(second, **kw).cache_dir.name == "hermes_cache_abdomen"
    kw["cache_dir"] = root / "hermes_cache"
    hd.preprocess(first, **kw)
    with pytest.raises(PreprocessError, match=r"holds another collection \('hermes_synthetic' "
                                               r"of .*collection.yaml\); give this one its own"):
        hd.preprocess(second, **kw)
    assert len(hd.PreprocessedCollection(root / "hermes_cache").datasets) == 4  # untouched
    assert len(hd.preprocess(first, **kw).datasets) == 4  # the same YAML again
    moved = root / "renamed.yaml"
    first.rename(moved)
    hd.preprocess(moved, **kw)
    assert len(hd.preprocess(second, overwrite=True, **kw).datasets) == 1


def test_interrupted_overwrite_and_mixed_caches_are_refused(synth, tmp_path, monkeypatch):
    """A re-run with other settings that stops half-way leaves a cache that does not open
    (before, the old collection.json served cases of two spacings); a case cached with other
    settings than its cache records is refused by name."""
    import importlib

    from hermes.training.commands import open_cache

    pp = importlib.import_module("hermes.data.preprocess")
    cache = tmp_path / "c"
    hd.preprocess(synth, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    real, calls = pp.preprocess_case, []

    def stop_after_one(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(pp, "preprocess_case", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        hd.preprocess(synth, cache_dir=cache, spacing=8.0, workers=1, progress=False,
                      overwrite=True)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        hd.PreprocessedCollection(cache)
    with pytest.raises(FileNotFoundError, match="preprocessing did not finish"):
        open_cache(str(cache), None, 1, False)
    pc = hd.preprocess(synth, cache_dir=cache, spacing=8.0, workers=1, progress=False)
    assert all(np.allclose(c.spacing, 8.0) for c in pc.cases)
    # one case rewritten with other settings behind the cache's back
    src = next(c for c in hd.load_collection(synth).cases() if c.dataset == "synth_t1")
    pp.preprocess_case(src, "T1", pp.PreprocessParams(10.0), cache.resolve())
    with pytest.raises(hd.CacheMismatchError, match=f"{src.case_id}.json: cached with other"):
        hd.PreprocessedCollection(cache)


def test_changed_modality_is_recached(synth, tmp_path):
    """T1 and T2 share a normalisation (same parameters hash): a dataset whose modality changes
    in the YAML is still re-cached, so its cases carry the new one."""
    shutil.copytree(synth.parent, tmp_path / "s")
    y = tmp_path / "s" / "collection.yaml"
    pc = hd.preprocess(y, cache_dir=tmp_path / "c", spacing=10.0, workers=1, progress=False)
    n_t1 = len([c for c in pc.cases if c.dataset == "synth_t1"])
    y.write_text(y.read_text().replace("modality: T1", "modality: T2"))
    pc = hd.preprocess(y, cache_dir=tmp_path / "c", spacing=10.0, workers=1, progress=False)
    assert {c.modality for c in pc.cases if c.dataset == "synth_t1"} == {"T2"}
    stats = json.loads((tmp_path / "c" / "collection.json").read_text())["stats"]
    assert stats["done"] == n_t1 and stats["skipped"] == len(pc) - n_t1


def _to_grid(arr, src_aff, dst_aff, dst_shape):
    """Oracle: nearest-neighbour pull of ``arr`` onto another grid of the same world space."""
    from scipy import ndimage

    m = np.linalg.inv(src_aff) @ dst_aff
    m = np.where(np.abs(m - np.round(m)) < 1e-6, np.round(m), m)
    return ndimage.affine_transform(arr, m[:3, :3], m[:3, 3], output_shape=tuple(dst_shape),
                                    order=0, mode="constant", cval=0)


def test_recorded_geometry_maps_back_to_the_original_grid(synth, tmp_path):
    from hermes.data.preprocess import PreprocessParams, prepare_arrays, prepare_image

    coll = hd.load_collection(synth)
    for case in coll.dataset("synth_t2").cases[:2] + coll.dataset("synth_ct").cases[:1]:
        img, aff = load_image(case.images[0], dtype=np.float32)
        lab, _ = load_image(case.label)
        canon_sp = hd.io.spacing_from_affine(reorient(lab, aff)[1])
        # identity resampling: the cached label is the original one, permuted/flipped/cropped
        params = PreprocessParams(spacing=canon_sp, image_order=1)
        _, clab, geom = prepare_arrays(img[None], aff, "T2", params, lab.astype(np.uint8))
        back = _to_grid(clab, np.array(geom["affine"]), aff, lab.shape)
        np.testing.assert_array_equal(back, lab)
        assert geom["original"]["axcodes"] == list(nib.aff2axcodes(aff))
    # prepare_image (inference) reproduces the cached image of a training case
    pc = hd.preprocess(synth, cache_dir=tmp_path / "c", spacing=7.0, workers=1, progress=False,
                       image_order=1)
    cached = pc.case("synth_ct/synth_ct_000")
    src = next(c for c in coll.cases() if c.key == cached.key)
    img, geom = prepare_image(src.images, "CT", spacing=7.0, image_order=1)
    np.testing.assert_allclose(img, cached.image, atol=1e-5)
    np.testing.assert_allclose(geom["affine"], cached.affine)


def test_non_finite_image_is_an_error_naming_the_file(tmp_path):
    from hermes.data.preprocess import prepare_image

    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    hd.save_image(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(ValueError, match=r"nan.nii.gz: image has 1 non-finite"):
        prepare_image(tmp_path / "nan.nii.gz", "T1")
    hd.save_image(tmp_path / "blank.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"blank.nii.gz: image is empty"):  # as segment()
        prepare_image(tmp_path / "blank.nii.gz", "T1")


@pytest.mark.parametrize("spacing", [float("nan"), [1.0, 2.0], [1, 1, float("inf")], "a"])
def test_bad_spacing_is_named(spacing):
    from hermes.data.preprocess import PreprocessParams

    with pytest.raises(ValueError, match="spacing must be one positive number or three"):
        PreprocessParams(spacing)


def test_broken_cache_files_are_named_and_half_cases_not_served(synth, tmp_path, monkeypatch):
    import importlib

    pp = importlib.import_module("hermes.data.preprocess")  # hermes.data.preprocess: a function
    pc = hd.preprocess(synth, cache_dir=tmp_path / "c", spacing=10.0, workers=1, progress=False)
    case = pc.case("synth_ct/synth_ct_000")
    data = case.image_path.read_bytes()
    case.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"synth_ct_000_image.npy: cached array unreadable.*"
                                      r"hermes preprocess"):
        _ = hd.PreprocessedCollection(tmp_path / "c").case("synth_ct/synth_ct_000").image
    # a case whose rewrite fails half-way has no JSON: the cache does not serve it
    coll = hd.load_collection(synth)
    src = next(c for c in coll.cases() if c.key == "synth_ct/synth_ct_000")
    real = pp._atomic_save_npy

    def fail_on_label(path, array):
        if path.name.endswith("_label.npy"):
            raise OSError(28, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(pp, "_atomic_save_npy", fail_on_label)
    with pytest.raises(OSError, match="No space left"):
        pp.preprocess_case(src, "CT", pp.PreprocessParams(10.0), (tmp_path / "c").resolve())
    assert not (tmp_path / "c" / "synth_ct" / "synth_ct_000.json").exists()
    with pytest.raises(FileNotFoundError, match="synth_ct_000.json: cached case missing"):
        hd.PreprocessedCollection(tmp_path / "c")


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("shape,scale,offset,out_shape", [
    ((20, 17, 9), (0.25, 0.5, 1.0), (-0.4, 0.3, 0.0), (81, 40, 9)),    # upsampling, edges
    ((30, 26, 12), (1.5, 2.0, 0.75), (0.2, -1.0, 3.5), (22, 15, 14)),  # down, past the end
    ((5, 1, 8), (0.4, 0.3, 1.0), (0.0, 0.0, -2.0), (12, 4, 8)),        # a one-voxel axis
])
def test_separable_resampling_matches_scipy(shape, scale, offset, out_shape, order,
                                            monkeypatch):
    from scipy import ndimage

    arr = np.random.default_rng(3).random(shape).astype(np.float32)
    ref = ndimage.affine_transform(arr.astype(np.float64), np.asarray(scale), np.asarray(offset),
                                   output_shape=out_shape, order=order, mode="nearest",
                                   prefilter=order > 1)
    got = separable_resample(arr, scale, offset, out_shape, order)
    assert got.dtype == np.float32 and got.shape == out_shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    from hermes.data import geometry

    monkeypatch.setattr(geometry, "SLAB_BYTES", 64)  # tiny slabs on every axis: many of them
    np.testing.assert_array_equal(separable_resample(arr, scale, offset, out_shape, order), got)
    # into a flipped, transposed view of a larger array: the same values
    big = np.full((out_shape[2] + 2, out_shape[1], out_shape[0] + 3), -7.0, np.float32)
    view = big[1:-1, ::-1, 3:].transpose(2, 1, 0)[:, :, ::-1]
    assert separable_resample(arr, scale, offset, out_shape, order, out=view) is view
    np.testing.assert_array_equal(view, got)
    assert (big[0] == -7).all() and (big[:, :, :3] == -7).all()
    with pytest.raises(ValueError, match="order"):
        separable_resample(arr, scale, offset, out_shape, 2)
    if order == 1:  # a window of the output: the same voxels to the bit
        rng = np.random.default_rng(len(shape))
        for _ in range(20):
            window = [tuple(sorted(rng.choice(m + 1, 2, replace=False))) for m in out_shape]
            part = separable_resample(arr, scale, offset, out_shape, 1, window=window)
            np.testing.assert_array_equal(part, got[tuple(slice(a, b) for a, b in window)])
    with pytest.raises(ValueError, match="window needs order 1"):
        separable_resample(arr, scale, offset, out_shape, order,
                           window=[(0, out_shape[0] + order), (0, 1), (0, 1)])


def test_label_values_lost_in_resampling_are_recorded_and_named(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 200, (30, 30, 30)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[5:15, 5:15, 5:15] = 1
    lab[20, 20, 20] = 2  # a 1 mm^3 lesion: no voxel of a 3 mm grid keeps it
    ds = tmp_path / "ds"
    hd.save_image(ds / "imagesTr" / "c0.nii.gz", img, np.eye(4))
    hd.save_image(ds / "labelsTr" / "c0.nii.gz", lab, np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "training": [{"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}]}))
    coll = hd.Collection.from_dict({"datasets": [{"name": "ds", "path": str(ds)}]})
    with pytest.warns(UserWarning, match=r"vanish when resampled to \[3.0, 3.0, 3.0\] mm.*"
                                         r"ds/c0: \[2\]"):
        pc = hd.preprocess(coll, cache_dir=tmp_path / "c", spacing=3.0, workers=1,
                           progress=False)
    case = pc.case("ds/c0")
    assert case.meta["lost_label_values"] == [2] and 2 not in case.present_values


def test_a_refused_preprocess_leaves_the_cache_usable_and_stale_temporaries_go(synth, tmp_path):
    """A run refused for its stored splits (a case added to the collection) changes nothing:
    the finished cache still opens. Temporaries of a run killed mid-write are removed by the
    next run."""
    from hermes.data.splits import SplitError

    src = tmp_path / "src"
    shutil.copytree(synth.parent, src, ignore=shutil.ignore_patterns("hermes_cache*"))
    yaml_path = src / synth.name
    cache = tmp_path / "c"
    hd.preprocess(yaml_path, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    stale = cache / "synth_t1" / ".synth_t1_000_image.npy.ab12cd_x.tmp"
    stale.write_bytes(b"half an array")
    kept = cache / "synth_t1" / ".notes.tmp"  # not one of ours: left alone
    kept.write_bytes(b"")
    ds = src / "synth_t1"
    added = [shutil.copy(ds / "imagesTr" / "synth_t1_000_0000.nii.gz",
                         ds / "imagesTr" / "synth_t1_900_0000.nii.gz"),
             shutil.copy(ds / "labelsTr" / "synth_t1_000.nii.gz",
                         ds / "labelsTr" / "synth_t1_900.nii.gz")]
    meta_text = (ds / "dataset.json").read_text()
    meta = json.loads(meta_text)
    (ds / "dataset.json").write_text(json.dumps({**meta, "numTraining": meta["numTraining"] + 1}))
    with pytest.raises(SplitError, match="cases added"):
        hd.preprocess(yaml_path, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    assert len(hd.PreprocessedCollection(cache).cases) > 0  # still opens
    assert stale.exists()  # nothing changed by the refused run
    for p in added:
        Path(p).unlink()
    (ds / "dataset.json").write_text(meta_text)
    hd.preprocess(yaml_path, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    assert not stale.exists() and kept.exists()


def test_a_task_no_case_labels_is_warned_about(synth, tmp_path):
    """A label value declared in dataset.json that no label file holds: the task would train as
    all background without a word."""
    src = tmp_path / "src"
    shutil.copytree(synth.parent, src, ignore=shutil.ignore_patterns("hermes_cache*"))
    meta_p = src / "synth_t1" / "dataset.json"
    meta = json.loads(meta_p.read_text())
    meta_p.write_text(json.dumps({**meta, "labels": {**meta["labels"], "tumour": 9}}))
    with pytest.warns(UserWarning, match=r"tasks that no case labels .*: synth_t1/tumour "
                                         r"\(synth_t1\)$"):
        hd.preprocess(src / synth.name, cache_dir=tmp_path / "c", spacing=10.0, workers=1,
                      progress=False)


def test_a_label_off_the_image_grid_is_refused_without_validation(synth, tmp_path):
    """validate=False skips the collection checks; preprocessing still compares the label's
    affine with the image's instead of taking the label on the image's grid."""
    from hermes.data.io import load_image, save_image

    shutil.copytree(synth.parent, tmp_path / "s")
    lab = tmp_path / "s" / "synth_t1" / "labelsTr" / "synth_t1_001.nii.gz"
    arr, aff = load_image(lab)
    aff[:3, 3] += 5.0
    save_image(lab, arr, aff)
    with pytest.raises(PreprocessError, match=r"synth_t1_001: ValueError: .* image and label "
                                               r"affines differ \(max abs difference 5\)"):
        hd.preprocess(tmp_path / "s" / "collection.yaml", cache_dir=tmp_path / "c",
                      spacing=10.0, workers=1, progress=False, validate=False)


def test_a_second_preprocessing_into_a_cache_is_refused(synth, tmp_path, capsys):
    """Two runs into one cache would remove each other's temporaries and collection.json:
    while one holds the cache's lock, another is refused at once and changes nothing."""
    from hermes.cli import main
    from hermes.files import LOCK_NAME, FolderBusyError, folder_lock

    cache = tmp_path / "c"
    hd.preprocess(synth, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    stale = cache / ".splits.json.ab12cd34.tmp"  # as another run's file being written
    stale.write_bytes(b"")

    def files() -> dict:  # the cache's files and contents, but the lock
        return {p: p.read_bytes() for p in cache.rglob("*")
                if p.is_file() and p.name != LOCK_NAME}

    before = files()
    with folder_lock(cache, "cache folder"):
        with pytest.raises(FolderBusyError, match=f"cache folder {cache.resolve()} is being "
                                                  "written by another Hermes process"):
            hd.preprocess(synth, cache_dir=cache, spacing=10.0, workers=1, progress=False)
        assert main(["preprocess", str(synth), "--cache-dir", str(cache), "--spacing", "10",
                     "--workers", "1", "--no-progress"]) == 1
        assert "hermes preprocess: error: cache folder" in capsys.readouterr().err
        assert files() == before
    hd.preprocess(synth, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    assert not stale.exists()


@pytest.mark.parametrize(("name", "text"), [
    ("collection.json", "my notes: DO NOT DELETE\n"),  # not JSON
    ("collection.json", '[{"patient": 1}]'),  # JSON, not an object
    ("collection.json", '{"patients": 2}'),  # another tool's object
    ("preprocess.json", "my notes\n"),  # was a bare "Expecting value" error
])
def test_a_users_file_named_like_a_cache_file_is_refused_by_name(synth, tmp_path, capsys, name,
                                                                  text):
    """A --cache-dir holding a collection.json or preprocess.json Hermes did not write: it is
    refused by name and left alone (a non-JSON collection.json was deleted and replaced);
    --overwrite replaces it."""
    from hermes.cli import main

    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / name).write_text(text)
    args = ["preprocess", str(synth), "--cache-dir", str(cache), "--spacing", "10", "--workers",
            "1", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hermes preprocess: error: {cache.resolve() / name} is not a Hermes "
                          f"cache's {name}") and err.count("\n") == 1, err
    assert (cache / name).read_text() == text
    with pytest.raises(PreprocessError, match=f"{name} is not a Hermes cache's"):
        hd.preprocess(synth, cache_dir=cache, spacing=10.0, workers=1, progress=False)
    assert (cache / name).read_text() == text
    assert main([*args, "--overwrite"]) == 0
    assert len(hd.PreprocessedCollection(cache).cases) > 0
