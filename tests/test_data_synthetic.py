"""Synthetic collection generator: determinism, anatomy in world space, partial labels."""

from __future__ import annotations

import hashlib
import time

import nibabel as nib
import numpy as np

from hermes.data import load_collection
from hermes.data.io import load_image
from hermes.data.synthetic import ALL_DATASETS, generate_collection, make_case


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".gz", ".nrrd"):
            arr, aff = load_image(p)
            h.update(p.name.encode() + arr.tobytes() + aff.tobytes())
    return h.hexdigest()


def test_seeded_and_deterministic(tmp_path):
    a = generate_collection(tmp_path / "a", seed=5, cases_per_dataset=2, size=(16, 20))
    b = generate_collection(tmp_path / "b", seed=5, cases_per_dataset=2, size=(16, 20))
    c = generate_collection(tmp_path / "c", seed=6, cases_per_dataset=2, size=(16, 20))
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)


def _world_centroid(mask, affine):
    idx = np.argwhere(mask).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_anatomy_is_fixed_in_world_space_under_random_orientation():
    rng = np.random.default_rng(0)
    codes = set()
    for _ in range(8):
        img, lab, aff = make_case(ALL_DATASETS["synth_ct"], rng, size=(28, 36))
        codes.add(nib.aff2axcodes(aff))
        liver = _world_centroid(lab == 1, aff)
        spleen = _world_centroid(lab == 3, aff)
        assert liver[0] > 20 and spleen[0] < -30  # liver on the right (+x RAS), spleen left
        # CT intensities: air about -1000 HU, liver about 62 HU
        assert np.median(img[lab == 1]) > 30 and np.median(img[lab == 1]) < 95
        assert img.min() < -900 and img.dtype == np.int16
        assert (lab == 4).sum() > 0 and np.all(np.isin(lab, [0, 1, 2, 3, 4]))
    assert len(codes) >= 5  # orientations really vary


def test_modalities_partial_labels_and_collection(tmp_path):
    t0 = time.perf_counter()
    y = generate_collection(tmp_path, seed=0, cases_per_dataset=2,
                            datasets=list(ALL_DATASETS), size=(24, 32))
    elapsed = time.perf_counter() - t0
    assert elapsed < 20  # typically well under 1 s
    coll = load_collection(y)
    assert coll.validate() == []
    assert coll.used_modalities == ["CT", "PET", "T1", "T2", "CINE"]
    # T1 labels liver+spleen only, although kidneys are visible in the image
    lab, _ = load_image(tmp_path / "synth_t1" / "labelsTr" / "synth_t1_000.nii.gz")
    assert set(np.unique(lab)) == {0, 1, 2}
    pet, aff = load_image(tmp_path / "synth_pet" / "imagesTr" / "synth_pet_000.nii.gz")
    plab, _ = load_image(tmp_path / "synth_pet" / "labelsTr" / "synth_pet_000.nii.gz")
    assert pet.min() >= 0 and np.mean(pet[plab == 2]) > 3 * np.mean(pet[(plab == 0) & (pet > 0.1)])
    t2, _ = load_image(tmp_path / "synth_t2" / "imagesTr" / "synth_t2_000_0000.nrrd")
    t2lab, _ = load_image(tmp_path / "synth_t2" / "labelsTr" / "synth_t2_000.nrrd")
    assert np.median(t2[t2lab == 2]) > np.median(t2[t2lab == 1])  # fluid (bladder) brightest
    cine_lab, _ = load_image(tmp_path / "synth_cine" / "labelsTr" / "synth_cine_000.nii.gz")
    assert set(np.unique(cine_lab)) == {0, 1, 2}
