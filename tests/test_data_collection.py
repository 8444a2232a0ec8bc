"""Collections: modality names, label maps, task naming, validation of every problem, splits."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from hermes.data import CollectionError, load_collection, save_image
from hermes.data.collection import Collection
from hermes.data.io import load_image
from hermes.data.labels import LabelMapError, parse_label_map
from hermes.data.modalities import UnknownModalityError, canonical_modality
from hermes.data.splits import SplitError, load_or_create_splits
from hermes.data.synthetic import generate_collection


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_collection(root, seed=3, cases_per_dataset=3, size=(16, 20),
                               predefined_test=1)


@pytest.fixture
def synth_copy(synth, tmp_path):
    shutil.copytree(synth.parent, tmp_path / "c")
    return tmp_path / "c" / "collection.yaml"


# ------------------------------------------------------------------ modalities
@pytest.mark.parametrize("alias,expected", [
    ("ct", "CT"), ("MR T1", "T1"), ("t1w", "T1"), ("T2-weighted", "T2"), ("cine MRI", "CINE"),
    ("Cine", "CINE"), ("FDG-PET", "PET"), ("pet", "PET"),
])
def test_modality_aliases(alias, expected):
    assert canonical_modality(alias) == expected


def test_unknown_modality_names_it_and_the_valid_ones():
    with pytest.raises(UnknownModalityError) as e:
        canonical_modality("ultrasound")
    msg = str(e.value)
    assert "'ultrasound'" in msg and "CT" in msg and "CINE" in msg
    assert canonical_modality("Ultrasound", extra=["ULTRASOUND"]) == "ULTRASOUND"


# ------------------------------------------------------------------ label maps
def test_label_map_orientations_and_unions():
    assert parse_label_map({"0": "background", "1": "liver", "2": "tumour"}) == {
        "liver": (1,), "tumour": (2,)}
    assert parse_label_map({"background": 0, "kidney": [1, 2], "tumour": 2}) == {
        "kidney": (1, 2), "tumour": (2,)}
    assert parse_label_map({1: "kidney", 2: "kidney", 3: "cyst"}) == {
        "kidney": (1, 2), "cyst": (3,)}


@pytest.mark.parametrize("bad,match", [
    ({1: "liver", "tumour": 2}, "mixes"),
    ({"liver": 0}, "value 0"),
    ({"liver": "x"}, "not an integer"),
    ({"0": "background"}, "no foreground"),
    ({1: "background"}, "not 0"),
])
def test_label_map_errors(bad, match):
    with pytest.raises(LabelMapError, match=match):
        parse_label_map(bad)


# ------------------------------------------------------------------ tasks
def test_task_vocabulary_shared_and_namespaced(synth):
    c = load_collection(synth)
    assert c.tasks == ["liver", "kidney", "spleen", "synth_ct/liver_tumour", "bladder",
                       "synth_pet/lesion"]
    assert c.modalities == ["CT", "PET", "T1", "T2", "CINE"]
    assert c.used_modalities == ["CT", "PET", "T1", "T2"]
    assert c.dataset("synth_t1").task_names == ["liver", "spleen"]
    assert c.task_indices("synth_pet") == [1, 4, 5]
    assert c.groups["synth_t2"] == {"tasks": ["kidney", "bladder"], "modality": "T2"}
    w = c.sampling_weights
    assert w["synth_ct"] == pytest.approx(2 / 5) and sum(w.values()) == pytest.approx(1)
    # MSD (training list) and nnU-Net v2 (_0000 channel files, NRRD) layouts both discovered
    assert [x.case_id for x in c.dataset("synth_t2").cases] == [
        "synth_t2_000", "synth_t2_001", "synth_t2_002"]
    assert c.dataset("synth_t2").cases[0].images[0].name == "synth_t2_000_0000.nrrd"
    # predefined test case (dataset.json "test" with labels)
    assert [x.case_id for x in c.dataset("synth_ct").cases if x.predefined_split] == [
        "synth_ct_002"]
    assert c.validate() == []


def test_namespacing_without_shared_and_alias_mapping(synth):
    root = synth.parent
    cfg = {"datasets": [
        {"name": "a", "path": str(root / "synth_ct"), "modality": "computed tomography",
         "labels": {1: "liver", 2: "kidney", 3: "spleen", 4: "liver_tumour"}},
        {"name": "b", "path": str(root / "synth_t1"), "modality": "MR T1",
         "labels": {"hepar": 1, "spleen": 2}, "shared": ["spleen"]},
    ], "shared_tasks": {"liver": ["a/liver", "b/hepar"], "spleen": ["spleen"]}}
    c = Collection.from_dict(cfg)
    assert c.validate(deep=False) == []
    assert c.tasks == ["liver", "a/kidney", "spleen", "a/liver_tumour"]
    assert c.dataset("b").task_names == ["liver", "spleen"]
    assert c.dataset("b").modality == "T1"
    # nothing shared: everything namespaced
    c2 = Collection.from_dict({"datasets": cfg["datasets"][1:2]})
    assert c2.tasks == ["b/hepar", "spleen"]


def _rewrite_yaml(path, fn):
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))


def test_validation_reports_every_problem_at_once(synth_copy):
    root = synth_copy.parent
    # 1. missing image file
    (root / "synth_t1" / "imagesTr" / "synth_t1_001_0000.nii.gz").unlink()
    # 2. label value not in the mapping
    lab_p = root / "synth_ct" / "labelsTr" / "synth_ct_001.nii.gz"
    lab, aff = load_image(lab_p)
    lab[0, 0, 0] = 7
    save_image(lab_p, lab, aff)
    # 3. image/label geometry mismatch (shifted origin)
    img_p = root / "synth_pet" / "imagesTr" / "synth_pet_000.nii.gz"
    img, aff = load_image(img_p)
    aff2 = aff.copy()
    aff2[:3, 3] += 5.0
    save_image(img_p, img, aff2)
    # 4. shape mismatch
    img_p2 = root / "synth_pet" / "imagesTr" / "synth_pet_001.nii.gz"
    img2, aff3 = load_image(img_p2)
    save_image(img_p2, img2[:-1], aff3)
    # 5. unknown modality, 6. corrupt label
    _rewrite_yaml(synth_copy, lambda c: c["datasets"][2].update(modality="ultrasound"))
    (root / "synth_t2" / "labelsTr" / "synth_t2_002.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    # 7. NaN voxels (in the case whose label has a bad value: both reported), 8. an image of
    # one value, 9. compressed data cut short (header intact)
    ct = root / "synth_ct" / "imagesTr"
    img, aff = load_image(ct / "synth_ct_001.nii.gz")
    img = img.astype(np.float32)
    img[3, 4, 5] = np.nan
    save_image(ct / "synth_ct_001.nii.gz", img, aff)
    img, aff = load_image(ct / "synth_ct_002.nii.gz")
    save_image(ct / "synth_ct_002.nii.gz", np.full(img.shape, -1000, np.int16), aff)
    t1 = root / "synth_t1" / "imagesTr" / "synth_t1_000_0000.nii.gz"
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2])

    coll = load_collection(synth_copy)
    problems = coll.validate(workers=2)
    kinds = sorted((p.kind, p.dataset, p.case) for p in problems)
    assert kinds == sorted([
        ("missing_file", "synth_t1", "synth_t1_001"),
        ("label_values", "synth_ct", "synth_ct_001"),
        ("geometry", "synth_pet", "synth_pet_000"),
        ("geometry", "synth_pet", "synth_pet_001"),
        ("modality", "synth_t2", None),
        ("unreadable", "synth_t2", "synth_t2_002"),
        ("image_values", "synth_ct", "synth_ct_001"),
        ("image_values", "synth_ct", "synth_ct_002"),
        ("unreadable", "synth_t1", "synth_t1_000"),
    ]), problems
    missing = next(p for p in problems if p.kind == "missing_file").message
    assert missing.startswith("image ") and "synth_t1/imagesTr/synth_t1_001_0000" in missing
    lv = next(p for p in problems if p.kind == "label_values")
    assert "7 (1 voxels)" in lv.message and "synth_ct_001.nii.gz" in lv.message
    assert "ultrasound" in next(p for p in problems if p.kind == "modality").message
    values = {p.case: p.message for p in problems if p.kind == "image_values"}
    assert "1 non-finite (NaN/inf) voxels" in values["synth_ct_001"]
    assert "every voxel equals -1000" in values["synth_ct_002"]
    cut = next(p for p in problems if p.case == "synth_t1_000")
    assert "synth_t1_000_0000.nii.gz" in cut.message, cut
    with pytest.raises(CollectionError) as e:
        coll.check()
    assert len(e.value.problems) == 9 and str(e.value).count("\n  - ") == 9
    # without image voxels, then shallow (headers only: no label values either)
    assert len(coll.validate(images=False)) == 6
    assert len(coll.validate(deep=False)) == 5


def test_declared_extra_modality_and_config_problems(synth_copy):
    def edit(c):
        c["modalities"] = ["US"]
        c["datasets"][0]["modality"] = "us"
        c["datasets"][1]["weight"] = -1
        c["datasets"][1]["bogus"] = 1
        c["datasets"].append({"name": "nope", "path": "missing_dir", "modality": "CT",
                              "labels": {1: "x"}})
    _rewrite_yaml(synth_copy, edit)
    c = load_collection(synth_copy)
    assert c.dataset("synth_ct").modality == "US" and c.modalities[-1] == "US"
    msgs = [str(p) for p in c.validate(deep=False)]
    assert any("'weight' must be a positive number" in m for m in msgs)
    assert any("unknown key 'bogus'" in m for m in msgs)
    assert any("missing_dir" in m and "not found" in m for m in msgs)


def test_invalid_yaml_raises(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("datasets: [\n  - name: x\n")
    with pytest.raises(CollectionError, match="invalid YAML"):
        load_collection(p)


# ------------------------------------------------------------------ splits
def test_splits_are_seeded_stored_and_reused(synth_copy, tmp_path):
    c = load_collection(synth_copy)
    sp_path = tmp_path / "splits.json"
    s1 = load_or_create_splits(c, sp_path)
    for ds in c.datasets:
        parts = s1["datasets"][ds.name]
        allc = sorted(parts["train"] + parts["val"] + parts["test"])
        assert allc == sorted(x.case_id for x in ds.cases)
        assert len(parts["val"]) == 1 and len(parts["train"]) >= 1
    assert s1["datasets"]["synth_ct"]["test"] == ["synth_ct_002"]
    # stored file is reused verbatim even with another seed requested
    stored = json.loads(sp_path.read_text())
    stored["datasets"]["synth_t1"] = {"train": ["synth_t1_000"], "val": [],
                                      "test": ["synth_t1_001", "synth_t1_002"]}
    sp_path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="seed 3, val_fraction 0.34.*asks for seed 99.*delete"):
        s2 = load_or_create_splits(c, sp_path, seed=99)
    assert s2["datasets"]["synth_t1"]["test"] == ["synth_t1_001", "synth_t1_002"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings it was made with: silent
        load_or_create_splits(c, sp_path)
    # determinism: a fresh file with the same seed gives the same split
    s3 = load_or_create_splits(c, tmp_path / "other.json")
    assert s3["datasets"] == s1["datasets"]
    # a new dataset is split and added; changed cases of a stored dataset are an error
    del stored["datasets"]["synth_pet"]
    sp_path.write_text(json.dumps(stored))
    s4 = load_or_create_splits(c, sp_path)
    assert s4["datasets"]["synth_pet"] == s1["datasets"]["synth_pet"]
    stored = json.loads(sp_path.read_text())
    stored["datasets"]["synth_t2"]["train"].append("ghost_case")
    sp_path.write_text(json.dumps(stored))
    with pytest.raises(SplitError, match="synth_t2.*ghost_case"):
        load_or_create_splits(c, sp_path)
    # a case declared test after the split was made must not stay in train (leakage)
    sp_path.write_text(json.dumps(s1))
    ds = c.dataset("synth_pet")
    moved = s1["datasets"]["synth_pet"]["train"][0]
    ds.cases = [replace(x, predefined_split="test") if x.case_id == moved else x
                for x in ds.cases]
    with pytest.raises(SplitError, match=f"synth_pet.*declared test \\['{moved}'\\]"):
        load_or_create_splits(c, sp_path)


def test_label_values_ok_with_union_map(tmp_path):
    # a dataset whose map uses a union (nnU-Net region style) accepts all its values
    ds = tmp_path / "d"
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1], lab[2, 2, 2] = 1, 2
    save_image(ds / "labelsTr" / "a.nii.gz", lab, np.eye(4))
    save_image(ds / "imagesTr" / "a_0000.nii.gz", lab.astype(np.float32), np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": [1, 2]},
        "file_ending": ".nii.gz", "numTraining": 1}))
    c = Collection.from_dict({"datasets": [{"name": "d", "path": str(ds)}]})
    assert c.validate() == []
    assert c.dataset("d").tasks[0].values == (1, 2) and c.dataset("d").modality == "CT"


def test_nnunet_case_ids_ending_in_four_digits(tmp_path):
    # AMOS-style names: labelsTr/amos_0001, imagesTr/amos_0001_0000 and _0001 (two channels)
    ds = tmp_path / "amos"
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 1
    for i in (1, 2):
        save_image(ds / "labelsTr" / f"amos_{i:04d}.nii.gz", lab, np.eye(4))
        for ch in (0, 1):
            save_image(ds / "imagesTr" / f"amos_{i:04d}_{ch:04d}.nii.gz",
                       lab.astype(np.float32), np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "CT"}, "labels": {"background": 0, "liver": 1},
        "file_ending": ".nii.gz", "numTraining": 2}))
    c = Collection.from_dict({"datasets": [{"name": "amos", "path": str(ds)}]})
    assert c.validate() == []
    cases = c.dataset("amos").cases
    assert [x.case_id for x in cases] == ["amos_0001", "amos_0002"]
    assert [p.name for p in cases[1].images] == ["amos_0002_0000.nii.gz", "amos_0002_0001.nii.gz"]
    assert cases[1].label.name == "amos_0002.nii.gz"


def test_datasets_with_different_channel_counts_are_reported(tmp_path):
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 1
    for name, channels in (("one", 1), ("two", 2)):
        ds = tmp_path / name
        save_image(ds / "labelsTr" / "a.nii.gz", lab, np.eye(4))
        for ch in range(channels):
            save_image(ds / "imagesTr" / f"a_{ch:04d}.nii.gz", lab.astype(np.float32), np.eye(4))
        (ds / "dataset.json").write_text(json.dumps({
            "channel_names": {str(i): "CT" for i in range(channels)},
            "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    # a single 4-D file with three channels counts three
    save_image(tmp_path / "msd" / "labelsTr" / "a.nii.gz", lab, np.eye(4))
    save_image(tmp_path / "msd" / "imagesTr" / "a.nii.gz",
               np.arange(192, dtype=np.float32).reshape(4, 4, 4, 3), np.eye(4))
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT", "1": "CT", "2": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    c = Collection.from_dict({"datasets": [{"name": n, "path": str(tmp_path / n)}
                                           for n in ("one", "two", "msd")]})
    problems = [p.message for p in c.validate()]
    assert problems == ["datasets have different numbers of image channels (one: 1, two: 2, "
                        "msd: 3); one model takes one channel count: train them in separate "
                        "collections"]
    assert Collection.from_dict({"datasets": [{"name": "one", "path": str(tmp_path / "one")}]}
                                ).validate() == []
    (tmp_path / "one" / "dataset.json").write_text("[1, 2]")  # JSON, but no dataset fields
    problems = [p.message for p in Collection.from_dict(
        {"datasets": [{"name": "one", "path": str(tmp_path / "one")}]}).validate()]
    assert any("dataset.json: holds a JSON list, not an object" in m for m in problems)


def test_cases_whose_channels_differ_within_a_dataset_are_named(tmp_path):
    """A case with another channel count than its dataset.json declares (or than the others),
    and a stray copy of a channel file in another format, are reported by case: both were
    cached as extra channels and failed only when training sampled the case."""
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 1
    ds = tmp_path / "d"
    for cid in ("a", "b", "c"):
        save_image(ds / "labelsTr" / f"{cid}.nii.gz", lab, np.eye(4))
        save_image(ds / "imagesTr" / f"{cid}_0000.nii.gz", lab.astype(np.float32), np.eye(4))
    save_image(ds / "imagesTr" / "b_0001.nii.gz", lab.astype(np.float32), np.eye(4))
    save_image(ds / "imagesTr" / "c_0000.nrrd", lab.astype(np.float32), np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}))
    problems = Collection.from_dict({"datasets": [{"name": "d", "path": str(ds)}]}).validate()
    msgs = sorted(p.message for p in problems)
    assert len(msgs) == 2
    assert msgs[0].startswith("2 case(s) with another number of image channels than 1 "
                              "(dataset.json's channel names): b (2), c (2)")
    assert msgs[1].startswith("several files for one image channel (c_0000.nii.gz, "
                              "c_0000.nrrd)")


def test_channel_files_must_be_numbered_from_zero_in_order(tmp_path):
    """nnU-Net channel files: a renamed file (_0000 missing, _0002 present) would have shifted
    the channels silently, a 4-D file among channel files carried more channels than files,
    a missing channel file is named."""
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 1
    img = lab.astype(np.float32)
    ds = tmp_path / "d"
    for cid in ("a", "b", "c", "d"):
        save_image(ds / "labelsTr" / f"{cid}.nii.gz", lab, np.eye(4))
    for name in ("a_0000", "a_0001", "b_0001", "b_0002", "d_0000"):
        save_image(ds / "imagesTr" / f"{name}.nii.gz", img, np.eye(4))
    save_image(ds / "imagesTr" / "c_0000.nii.gz", np.stack([img, img], -1), np.eye(4))
    save_image(ds / "imagesTr" / "c_0001.nii.gz", img, np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}))
    problems = Collection.from_dict({"datasets": [{"name": "d", "path": str(ds),
                                                   "modality": "T1"}]}).validate()
    msgs = {(p.case, p.message) for p in problems}
    assert (("b", "channel files numbered 0001, 0002; expected 0000, 0001 (one file per "
             "channel from _0000, in channel order)") in msgs), msgs
    count = next(m for c, m in msgs if c is None)
    assert "2 case(s) with another number of image channels than 2" in count
    assert "c (3)" in count and "d (1: no d_0001.nii.gz)" in count
    assert len(problems) == 2


def test_ignore_label_is_not_a_task_but_is_allowed(tmp_path):
    ds = tmp_path / "d"
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0] = 5  # unannotated
    lab[1, 1, 1] = 1
    save_image(ds / "labelsTr" / "a.nii.gz", lab, np.eye(4))
    save_image(ds / "imagesTr" / "a_0000.nii.gz", lab.astype(np.float32), np.eye(4))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "prostate": 1, "ignore": 5},
        "file_ending": ".nii.gz", "numTraining": 1}))
    c = Collection.from_dict({"datasets": [{"name": "d", "path": str(ds)}]})
    assert c.validate() == []
    assert c.tasks == ["d/prostate"] and c.dataset("d").ignore_values == (5,)
    both = Collection.from_dict({"datasets": [{"name": "d", "path": str(ds), "labels": {
        "background": 0, "prostate": [1, 5], "ignore": 5}}]})
    assert any("value(s) [5] are both a structure's and 'ignore'" in p.message
               for p in both.validate())
    import hermes.data as hd

    pc = hd.preprocess(c, cache_dir=tmp_path / "cache", spacing=1.0, workers=1,
                       progress=False)
    case = pc.cases[0]
    assert pc.datasets["d"].ignore_values == (5,)
    np.testing.assert_array_equal(case.ignore_mask(), np.asarray(case.label) == 5)
    assert case.ignore_mask().sum() == 16
    # the unannotated voxels travel with training batches (for the loss to skip them) ...
    from hermes.training.sampling import PatchDataset, collate_partial

    item = PatchDataset(pc, case.shape, augment=False, fg_prob=0.0)[0]
    np.testing.assert_array_equal(item["ignore"][0].numpy(), case.ignore_mask())
    assert item["targets"].shape[0] == 1  # one task: the ignore mask is not a target
    batch = collate_partial([item])
    assert batch["ignore"].shape == (1, 1, *case.shape)
    # augmented crops move the mask with the label (nearest): it still marks no target voxel
    aug = PatchDataset(pc, case.shape, augment=True, fg_prob=0.0)
    for i in range(4):
        it = aug[i]
        assert it["ignore"].dtype == torch.bool and it["ignore"].shape == (1, *case.shape)
        assert not (it["ignore"] & it["targets"].bool()).any()
    # ... and evaluation does not score predictions there
    from hermes.training.evaluate import evaluate

    truth = np.isin(np.asarray(case.label), (1,))[None]
    exact = evaluate(None, pc, "train", predict=lambda c: truth)
    spill = evaluate(None, pc, "train", predict=lambda c: truth | case.ignore_mask()[None])
    assert exact.rows[0]["dice"] == spill.rows[0]["dice"] == 1.0
    assert spill.rows[0]["pred_voxels"] == 1


def test_malformed_settings_are_reported(synth_copy):
    def edit(c):
        c["spacing"] = [1.5, -1]
        c["splits"] = {"seed": "abc"}
        c["normalization"] = {"CT": {"window": [0, 1]}}
    _rewrite_yaml(synth_copy, edit)
    msgs = [str(p) for p in load_collection(synth_copy).validate(deep=False)]
    assert any("'spacing' must be" in m for m in msgs)
    assert any("'splits' must be" in m for m in msgs)
    assert any("normalization for CT: unknown key 'window'" in m for m in msgs)
    _rewrite_yaml(synth_copy, lambda c: c.update(normalization={"TI": {"percentiles": [1, 99]}}))
    msgs = [str(p) for p in load_collection(synth_copy).validate(deep=False)]
    assert any("normalization: unknown modality 'TI'" in m for m in msgs)
    _rewrite_yaml(synth_copy, lambda c: c.update(normalization={}))
    _rewrite_yaml(synth_copy, lambda c: c.update(splits={"sed": 3, "val_fraction": 0.5}))
    msgs = [str(p) for p in load_collection(synth_copy).validate(deep=False)]
    assert "config: unknown key 'sed' in 'splits' (known: seed, val_fraction)" in msgs
    assert not any("'splits' must be" in m for m in msgs)


def test_a_dataset_folder_is_a_collection_of_itself(tmp_path):
    """nnU-Net users give a dataset folder: its dataset.json names modality and labels; the
    cache goes beside it, and training opens it like a YAML."""
    from hermes.data.preprocess import resolve_cache_dir
    from hermes.training.commands import open_cache

    root = generate_collection(tmp_path / "raw", seed=4, cases_per_dataset=2, size=(16, 20),
                               datasets=("synth_ct",)).parent
    folder = root / "synth_ct"
    coll = load_collection(folder)
    assert coll.name == "synth_ct" and [d.name for d in coll.datasets] == ["synth_ct"]
    assert coll.datasets[0].modality == "CT" and len(coll.datasets[0].cases) == 2
    assert "liver" in coll.datasets[0].task_names  # dataset.json's names, no ds/ prefix
    coll.check(deep=True)  # raises on problems
    assert resolve_cache_dir(coll, None) == root / "hermes_cache_synth_ct"
    pc = open_cache(str(folder), None, 1, False)
    assert pc.cache_dir == root / "hermes_cache_synth_ct" and len(pc.cases) == 2
    assert not any(p.name.startswith("hermes_cache") for p in folder.iterdir())
    with pytest.raises(CollectionError, match="folder without dataset.json"):
        load_collection(folder / "imagesTr")


def test_a_structure_named_on_value_0_is_warned_about(tmp_path):
    """Value 0 is the background: a map naming a structure there (values counted from 0) is
    said, not dropped silently; background names on 0 are fine."""
    (tmp_path / "d").mkdir()
    spec = {"name": "d", "path": str(tmp_path / "d"), "modality": "CT"}
    with pytest.warns(UserWarning, match="dataset d: label value 0 is named 'liver'"):
        c = Collection.from_dict({"datasets": [{**spec, "labels": {0: "liver", 1: "tumour"}}]})
    assert c.tasks == ["d/tumour"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Collection.from_dict({"datasets": [{**spec, "labels": {0: "Background", 1: "liver"}}]})


def test_a_dataset_of_several_channel_modalities_is_told_to_name_one(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "lesion": 1}}))
    problems = [p.message for p in Collection.from_dict(
        {"datasets": [{"name": "d", "path": str(tmp_path / "d")}]}).validate()]
    assert any("(its channels: CT, PET); give the dataset's modality (e.g. `modality: CT`) in "
               "a collection YAML" in m for m in problems)
    # with its modality, each channel may be normalised as its own (the list's length checked)
    spec = {"name": "d", "path": str(tmp_path / "d"), "modality": "PET"}
    ok = Collection.from_dict({"datasets": [spec], "normalization": {"PET": ["CT", "PET"]}})
    assert not [p for p in ok.validate() if "normalization" in p.message]
    bad = Collection.from_dict({"datasets": [spec], "normalization": {"PET": ["CT"]}})
    assert any("normalization for PET lists 1 channels, the dataset's images have 2 (CT, PET)"
               in p.message for p in bad.validate())
    # without that list the CT channel is normalised as PET: said (nnU-Net goes by channel)
    with pytest.warns(UserWarning, match=r"channel 0 is CT \(dataset.json channel_names\) but "
                                         r"every channel is normalised as PET.*\{PET: \[CT, "
                                         r"PET\]\}"):
        Collection.from_dict({"datasets": [spec]})


def _msd(root, cases: int, listed: int, num: int, extra: list | None = None):
    """An MSD dataset folder with ``cases`` label/image pairs, ``listed`` of them in its
    training list (plus ``extra`` entries) and ``numTraining`` = ``num``."""
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 1
    for i in range(cases):
        save_image(root / "labelsTr" / f"c{i}.nii.gz", lab, np.eye(4))
        save_image(root / "imagesTr" / f"c{i}.nii.gz", lab.astype(np.float32), np.eye(4))
    training = [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"}
                for i in range(listed)] + (extra or [])
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "numTraining": num, "training": training}))
    return Collection.from_dict({"datasets": [{"name": "d", "path": str(root)}]})


def test_msd_lists_and_label_files_that_would_change_the_training_data(tmp_path):
    """An MSD training list leaving out labelled cases on disk (nnU-Net scans the folders),
    a numTraining that disagrees, malformed entries (a null label, a list of channel files is
    fine) and two label files of one case are problems, not silent choices."""
    msgs = [p.message for p in _msd(tmp_path / "stale", 5, 3, 5).validate()]
    assert any("labelsTr holds 2 label(s) that dataset.json's training list leaves out (c3, c4)"
               in m for m in msgs)
    assert any("numTraining=5 but its training list has 3 entries" in m for m in msgs)
    c = _msd(tmp_path / "entries", 2, 1, 3, extra=[
        {"image": ["./imagesTr/c1.nii.gz"], "label": "./labelsTr/c1.nii.gz"},
        {"image": "./imagesTr/c1.nii.gz", "label": None}])
    msgs = [p.message for p in c.validate()]
    assert [x.case_id for x in c.dataset("d").cases] == ["c0", "c1"]
    assert any("training[2] needs a label path and an image path" in m for m in msgs)
    nn = tmp_path / "nn"
    lab = np.zeros((4, 4, 4), np.uint8)
    save_image(nn / "labelsTr" / "a.nii.gz", lab, np.eye(4))
    save_image(nn / "labelsTr" / "a.nii", lab, np.eye(4))  # a stale copy sorting first
    save_image(nn / "imagesTr" / "a_0000.nii.gz", lab.astype(np.float32), np.eye(4))
    (nn / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}))
    msgs = [p.message for p in Collection.from_dict(
        {"datasets": [{"name": "nn", "path": str(nn)}]}).validate()]
    assert any("several label files for one case (a.nii, a.nii.gz)" in m for m in msgs)


def test_shared_names_spelled_otherwise_and_a_single_test_case(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    c = Collection.from_dict({"shared_tasks": ["liver"], "datasets": [
        {"name": "a", "path": str(tmp_path / "a"), "modality": "CT", "labels": {1: "Liver"}},
        {"name": "b", "path": str(tmp_path / "b"), "modality": "CT", "labels": {1: "liver"},
         "test_cases": "b1"}]})
    msgs = [p.message for p in c.validate()]
    assert any("shared_tasks entry 'liver' is spelled 'Liver' in some dataset's labels" in m
               for m in msgs)
    # one test case given alone is that case, not its characters
    assert any("test_cases names unknown case 'b1'" in m for m in msgs)
    assert not any("unknown case 'b'" in m for m in msgs)


def test_validation_reads_each_header_once(synth, monkeypatch):
    import hermes.data.collection as coll

    reads: list[str] = []
    real = coll.load_header
    monkeypatch.setattr(coll, "load_header", lambda p: reads.append(str(p)) or real(p))
    c = coll.load_collection(synth)
    assert c.validate(deep=False) == []
    files = [str(p) for case in c.cases() for p in (*case.images, case.label)]
    assert sorted(reads) == sorted(files)
