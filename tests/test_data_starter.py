"""Starter collection: label derivations on small hand-made arrays, the .inv3 reader, and the
real download (marked slow: needs PyPI/Debian, about a minute)."""

from __future__ import annotations

import io
import os
import plistlib
import tarfile

import numpy as np
import pytest

from hermes.data.starter import (
    derive_brain_tissue_labels,
    derive_chest_ct_labels,
    derive_head_ct_labels,
    read_inv3,
    simulate_pet,
    simulate_t2,
)


def test_brain_tissue_labels_by_hand():
    t1 = np.array([0, 10, 10, 10, 10, 10], np.float32).reshape(6, 1, 1)
    gm = np.array([0.9, 0.6, 0.3, 0.5, 0.4, 0.45], np.float32).reshape(6, 1, 1)
    wm = np.array([0.0, 0.4, 0.7, 0.5, 0.4, 0.55], np.float32).reshape(6, 1, 1)
    lab = derive_brain_tissue_labels(t1, gm, wm)
    # outside the brain (T1 = 0) stays 0 whatever GM says; GM; WM; tie at 0.5 -> rest; WM
    assert lab.ravel().tolist() == [0, 1, 2, 3, 3, 2]
    # 0..255 probability maps are rescaled
    lab255 = derive_brain_tissue_labels(t1, gm * 255, wm * 255)
    np.testing.assert_array_equal(lab, lab255)


def _chest_phantom():
    hu = np.full((40, 40, 6), -1000, np.int16)  # air around the patient
    yy, xx = np.mgrid[:40, :40]
    body = ((xx - 20) / 17) ** 2 + ((yy - 20) / 13) ** 2 <= 1
    lung_l = ((xx - 13) / 5) ** 2 + ((yy - 20) / 7) ** 2 <= 1
    lung_r = ((xx - 27) / 5) ** 2 + ((yy - 20) / 7) ** 2 <= 1
    bone = ((xx - 20) / 2) ** 2 + ((yy - 30) / 2) ** 2 <= 1
    bubble = (xx == 20) & (yy == 12)  # tiny gas pocket: not lung
    for z in range(6):
        s = hu[:, :, z]
        s[body] = 40
        s[lung_l | lung_r] = -850
        s[bone] = 700
        s[bubble] = -900
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[14:16, 18:20, 2:4] = 1  # soft tissue between the lungs
    return hu, lesion, body, lung_l | lung_r, bone, bubble


def test_chest_ct_labels_by_hand():
    hu, lesion, body, lungs, bone, bubble = _chest_phantom()
    lab = derive_chest_ct_labels(hu, lesion)
    for z in range(6):
        s = lab[:, :, z]
        les = lesion[:, :, z] > 0
        assert np.all(s[~body] == 0)
        assert np.all(s[lungs & ~les] == 2)
        assert np.all(s[bone & ~les] == 3)
        assert s[bubble][0] == 1  # small air pocket stays body tissue
        assert np.all(s[body & ~lungs & ~bone & ~les] == 1)
    assert np.all(lab[lesion > 0] == 4)
    assert set(np.unique(derive_chest_ct_labels(hu))) == {0, 1, 2, 3}


def test_head_ct_labels():
    head = np.zeros((6, 6, 6), bool)
    head[1:4, 1:4, 1:4] = True  # the head (27 voxels)
    head[5, 5, 5] = True  # a separate blob (head holder): dropped
    bone = np.zeros_like(head)
    bone[1, 1, 1] = bone[5, 5, 5] = bone[0, 0, 0] = True
    lab = derive_head_ct_labels(head, bone)
    assert lab[1, 1, 1] == 2 and lab[2, 2, 2] == 1
    assert lab[5, 5, 5] == 0 and lab[0, 0, 0] == 0  # bone outside the head is dropped
    assert (lab == 1).sum() == 26 and (lab == 2).sum() == 1


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(f"tmpx/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_read_inv3_layout_and_orientation(tmp_path):
    z, y, x = 3, 4, 5
    vol = np.arange(z * y * x, dtype="<i2").reshape(z, y, x)
    mask = np.zeros((z + 1, y + 1, x + 1), np.uint8)
    mask[0] = 1  # bookkeeping row/column: must be dropped
    mask[2, 3, 4] = 255  # voxel (z=1, y=2, x=3) of the volume
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [z, y, x]},
            "masks": {"0": "mask_0.plist"}, "spacing": [0.5, 0.6, 2.0]}
    mplist = {"mask_file": "mask_0.dat", "mask_shape": [z + 1, y + 1, x + 1], "name": "Bone",
              "threshold_range": [226, 3071]}
    p = tmp_path / "t.inv3"
    with tarfile.open(p, "w:gz") as tar:
        _tar_add(tar, "main.plist", plistlib.dumps(main))
        _tar_add(tar, "mask_0.plist", plistlib.dumps(mplist))
        _tar_add(tar, "matrix.dat", vol.tobytes())
        _tar_add(tar, "mask_0.dat", mask.tobytes())
    data, aff, masks = read_inv3(p)
    assert data.shape == (x, y, z) and data[3, 2, 1] == vol[1, 2, 3]
    m = masks["Bone"]["mask"]
    assert m.shape == (x, y, z) and m.sum() == 1 and m[3, 2, 1]
    # columns -> left, rows -> anterior (VTK row order), slices -> superior
    np.testing.assert_allclose(np.diag(aff), [-0.5, 0.6, 2.0, 1.0])


def test_simulations_have_the_documented_contrast():
    tissue = np.zeros((30, 30, 30), np.uint8)
    tissue[5:25, 5:25, 5:25] = 2  # WM
    tissue[5:25, 5:25, 5:10] = 1  # GM
    tissue[12:18, 12:18, 15:20] = 3  # CSF
    aff = np.eye(4)
    t2 = simulate_t2(tissue, seed=1, affine=aff)
    med = [np.median(t2[tissue == v]) for v in (1, 2, 3)]
    assert med[2] > med[0] > med[1]  # CSF > GM > WM on T2
    pet = simulate_pet(tissue, aff, seed=1)
    assert pet.min() >= 0
    assert np.median(pet[tissue == 1]) > 1.5 * np.median(pet[tissue == 2])  # GM > WM uptake
    np.testing.assert_array_equal(simulate_t2(tissue, seed=1, affine=aff), t2)  # seeded


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HERMES_TEST_DOWNLOADS"),
                    reason="downloads from PyPI/Debian; set HERMES_TEST_DOWNLOADS=1")
def test_build_starter_collection_for_real(tmp_path):
    import hermes.data as hd
    from hermes.data.starter import build_starter_collection

    path = build_starter_collection(tmp_path / "starter")
    coll = hd.load_collection(path)
    assert coll.validate() == []
    names = [d.name for d in coll.datasets]
    assert {"radiomics_chest_ct", "invesalius_head_ct", "mni152_t1_brain", "mni152_t1_head",
            "mni152_t2_SIMULATED", "mni152_pet_SIMULATED"} <= set(names)
    assert coll.used_modalities == ["CT", "PET", "T1", "T2"]
    assert "brain" in coll.tasks and "bone" in coll.tasks
    md = (tmp_path / "starter" / "PROVENANCE.md").read_text()
    assert "SIMULATED" in md and "BSD-3-Clause" in md and "GPL-2" in md


def test_starter_refuses_dataset_folders_already_in_dir(tmp_path, capsys, monkeypatch):
    """``hermes data starter`` checks the dataset folders it would write (as ``data synthetic``
    does) before any download; ``--no-simulated`` leaves the simulated ones aside."""
    import hermes.data.starter as starter
    from hermes.cli import main

    ran = []
    monkeypatch.setattr(starter, "build_starter_collection", lambda *a, **k: ran.append(1))
    mine = tmp_path / "st" / "mni152_t1_brain" / "imagesTr" / "my_case_0000.nii.gz"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own image")
    assert main(["data", "starter", str(tmp_path / "st"), "--sources", "nilearn"]) == 1
    assert "already holds mni152_t1_brain" in capsys.readouterr().err and not ran
    assert mine.read_bytes() == b"my own image"
    simulated = tmp_path / "sim" / "mni152_pet_SIMULATED"
    simulated.mkdir(parents=True)
    assert main(["data", "starter", str(tmp_path / "sim"), "--sources", "nilearn",
                 "--no-simulated"]) == 0 and ran == [1]
    assert main(["data", "starter", str(tmp_path / "sim"), "--sources", "nilearn"]) == 1
    assert set(starter.SOURCE_DATASETS) == set(starter.SOURCES)
