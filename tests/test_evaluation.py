"""Evaluation at the original geometry: grid mapping, metrics, and the whole protocol."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hermes.data as hd
from hermes.data.geometry import crop, nonzero_bbox, reorient
from hermes.data.synthetic import generate_collection
from hermes.inference.geometry import resample_to_grid
from hermes.training.evaluate import evaluate, mask_metrics


def test_metrics_hand_computed():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True  # shifted by one voxel along x
    with warnings.catch_warnings():  # nothing of MONAI's internals reaches the user
        warnings.simplefilter("error")
        m = mask_metrics(a, b, spacing=(2.0, 1.0, 1.0), tolerance_mm=0.5)
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert m["hd95"] == pytest.approx(2.0)  # one voxel along x = 2 mm
    same = mask_metrics(a, a, spacing=(1, 1, 1), tolerance_mm=1.0)
    assert same == {"dice": pytest.approx(1.0), "nsd": pytest.approx(1.0), "hd95": 0.0}
    neither = mask_metrics(a & False, a & False, (1, 1, 1), 1.0)  # not scored (nnU-Net)
    assert sorted(neither) == ["dice", "hd95", "nsd"] and all(map(math.isnan, neither.values()))
    miss = mask_metrics(np.zeros_like(a), a, (1, 1, 1), 1.0)
    assert miss["dice"] == 0.0 and math.isnan(miss["hd95"])


def test_surface_metrics_equal_monais():
    """NSD and HD95 from distance transforms equal MONAI's own (KD-tree) computation on ragged
    masks of random boxes and noise, anisotropic spacing, several tolerances."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(7)
    checked = 0
    while checked < 12:
        shape = tuple(int(v) for v in rng.integers(8, 30, 3))
        masks = []
        for _ in range(2):
            m = np.zeros(shape, bool)
            lo = [int(rng.integers(0, s - 2)) for s in shape]
            box = tuple(slice(a, a + int(rng.integers(2, s - a + 1)))
                        for a, s in zip(lo, shape, strict=True))
            m[box] = True
            m[rng.random(shape) < 0.03] ^= True
            masks.append(m)
        pred, gt = masks
        spacing, tol = list(rng.uniform(0.5, 4.0, 3)), float(rng.choice([0.5, 1.0, 2.0, 3.0]))
        ours = mask_metrics(pred, gt, spacing, tol)
        yp, yg = (torch.from_numpy(m)[None, None].float() for m in (pred, gt))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nsd = compute_surface_dice(yp, yg, [tol], include_background=True, spacing=spacing)
            hd = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95,
                                            spacing=spacing)
        assert ours["nsd"] == pytest.approx(nsd.item(), abs=1e-6)
        assert ours["hd95"] == pytest.approx(hd.item(), rel=1e-5)
        checked += 1


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("S", "R", "A"), ("A", "I", "L")])
def test_canonical_crop_maps_back_exactly(codes):
    rng = np.random.default_rng(0)
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff

    shape = (14, 11, 9)
    label = np.zeros(shape, np.uint8)
    label[3:10, 2:8, 1:7] = rng.integers(0, 4, (7, 6, 6))
    # an affine whose axes point along `codes`, with anisotropic spacing and an offset
    ornt = axcodes2ornt(codes)
    affine = inv_ornt_aff(ornt, shape) @ np.diag([0.8, 1.5, 3.0, 1.0])
    affine[:3, 3] += [10.0, -5.0, 2.5]
    canon, canon_aff = reorient(label, affine)
    bbox = nonzero_bbox(np.ascontiguousarray(canon) > 0)
    cropped, crop_aff = crop(np.ascontiguousarray(canon), canon_aff, bbox)
    back = resample_to_grid(cropped, crop_aff, affine, shape, order=0)
    np.testing.assert_array_equal(back, label)


@pytest.mark.parametrize("linear", [np.eye(3), np.array([[0, 0, 1.3], [-1.1, 0, 0], [0, -2.2, 0]])])
def test_model_grid_masks_map_back_to_the_border_voxels(linear):
    """A prediction on the model grid mapped back (evaluate, segment): the original grid's
    outer voxels, up to half a model voxel beyond the model grid's outer voxel centres, take
    the nearest prediction instead of being dropped (extents that are no multiple of the
    model spacing)."""
    from hermes.data.preprocess import PreprocessParams, prepare_arrays
    from hermes.inference.geometry import BackMapper

    shape = (31, 27, 23)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [4.0, -3.0, 2.0]
    ijk = np.indices(shape).reshape(3, -1)
    world = (linear @ ijk).reshape(3, *shape) + affine[:3, 3, None, None, None]
    label = (world[0] + 0.5 * world[1] - 0.3 * world[2] > 3.0).astype(np.uint8)
    image = (1000.0 + label)[None].astype(np.float32)
    params = PreprocessParams(1.5, 1, "float32", 0, False, {"T1": {"kind": "none"}})
    _, cached_label, geom = prepare_arrays(image, affine, "T1", params, label)
    back = BackMapper(geom)(cached_label > 0, order=0)
    assert back.shape == shape and back.dtype == bool
    gt = label > 0
    dice = 2 * (back & gt).sum() / (back.sum() + gt.sum())
    assert dice > 0.97
    for axis in range(3):
        for end in (0, -1):
            face = [slice(None)] * 3
            face[axis] = end
            on_face = gt[tuple(face)]
            if on_face.sum() > 20:  # the face's structure voxels come back
                assert (back[tuple(face)] & on_face).sum() > 0.8 * on_face.sum()

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsynth")
    y = generate_collection(root / "src", seed=11, cases_per_dataset=3,
                            datasets=("synth_ct", "synth_t1", "synth_pet"), size=(32, 40))
    hd.preprocess(hd.load_collection(y), root / "cache", workers=1, progress=False,
                  image_order=1)
    return hd.PreprocessedCollection(root / "cache")


def test_perfect_prediction_scores_near_one_at_original_geometry(cache, tmp_path):
    def oracle(case):
        return case.task_targets()

    res = evaluate(None, cache, split="val", predict=oracle, progress=False)
    val_cases = cache.split("val")
    assert len(res.rows) == sum(len(c.info.tasks) for c in val_cases)
    for r in res.rows:
        if r["gt_voxels"] > 50:  # resampling to 1.5 mm and back loses only boundary voxels
            assert r["dice"] > 0.85, r
    summary = res.summary()
    assert {s["dataset"] for s in summary} == {c.dataset for c in val_cases}
    res.write_csv(tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().startswith("dataset,case,task,dice")
    assert "Dice" in res.table()


def test_empty_prediction_scores_zero(cache):
    res = evaluate(None, cache, split="val", progress=False,
                   predict=lambda c: np.zeros((len(c.info.tasks), *c.shape), bool))
    for r in res.rows:  # a structure in neither mask is not scored; a missed one scores 0
        assert math.isnan(r["dice"]) if r["gt_voxels"] == 0 else r["dice"] == 0.0
    # missed structures have no HD95: the summary and table say how many cases its mean covers
    for s in res.summary():
        rows = [r for r in res.rows if (r["dataset"], r["task"]) == (s["dataset"], s["task"])]
        assert s["scored"] == sum(r["gt_voxels"] > 0 for r in rows) <= s["cases"]
        assert s["hd95_cases"] == 0 and (s["dice"] == 0.0 or s["scored"] == 0)
    assert "n HD95" in res.table().splitlines()[0]


def test_summary_means_leave_out_cases_without_the_structure():
    """As nnU-Net and MONAI: a structure in neither mask is no case of its mean (it scored
    Dice 1 and HD95 0 before, inflating the means of rare structures)."""
    from hermes.training.evaluate import EvaluationResult

    nan = math.nan
    rows = [{"dataset": "d", "task": "tumour", "dice": 0.5, "nsd": 0.4, "hd95": 6.0}] * 6 + \
        [{"dataset": "d", "task": "tumour", "dice": nan, "nsd": nan, "hd95": nan}] * 4 + \
        [{"dataset": "d", "task": "cyst", "dice": 0.0, "nsd": 0.0, "hd95": nan}] + \
        [{"dataset": "d", "task": "cyst", "dice": nan, "nsd": nan, "hd95": nan}] * 9
    tumour, cyst = EvaluationResult(rows).summary()
    assert tumour == {"dataset": "d", "task": "tumour", "cases": 10, "scored": 6, "dice": 0.5,
                      "nsd": pytest.approx(0.4), "hd95": 6.0, "hd95_cases": 6}
    assert (cyst["scored"], cyst["dice"], cyst["hd95_cases"]) == (1, 0.0, 0)  # a false positive
    assert math.isnan(cyst["hd95"])
    line = EvaluationResult(rows).table().splitlines()[1].split()
    assert line[2:] == ["6", "0.5000", "0.4000", "6.00", "6"]


def test_datasets_filter_evaluates_only_those_datasets(cache):
    def empty(c):
        return np.zeros((len(c.info.tasks), *c.shape), bool)

    res = evaluate(None, cache, split="val", progress=False, predict=empty,
                   datasets=["synth_t1"])
    expected = {c.case_id for c in cache.split("val") if c.dataset == "synth_t1"}
    assert expected and {r["case"] for r in res.rows} == expected
    with pytest.raises(ValueError, match="unknown dataset.*synth_xx"):
        evaluate(None, cache, split="val", progress=False, predict=empty,
                 datasets=["synth_xx"])


def test_evaluate_command_refuses_a_cache_on_another_grid(cache, tmp_path, capsys):
    import hermes.models as hm
    from hermes.cli import main

    net = hm.build("tiny", tasks=cache.tasks, modalities=cache.modalities)
    other = {**cache.params, "spacing": [4.0, 4.0, 4.0]}
    hm.save(net, tmp_path / "m.hermes", metadata={"preprocess": other})
    rc = main(["evaluate", str(tmp_path / "m.hermes"), str(cache.cache_dir), "--split", "val",
               "--quiet", "--out", str(tmp_path / "m.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and "spacing [4.0, 4.0, 4.0]" in err and "--spacing 4 4 4" in err
    assert not (tmp_path / "m.csv").exists()


def test_tasks_the_model_lacks_are_refused_before_inference(cache, monkeypatch):
    import hermes.models as hm
    import hermes.training.evaluate as ev

    known = [t for t in cache.tasks if not t.endswith("liver")]
    net = hm.build("tiny", tasks=known, modalities=cache.modalities)
    ran = []
    monkeypatch.setattr(ev, "predict_case", lambda *a, **k: ran.append(1))
    with pytest.raises(KeyError, match=r"does not know 2 task\(s\) of this collection "
                                       r"\('liver' of synth_.*\): it was trained on other"):
        evaluate(net, cache, split="val", progress=False)
    assert not ran


def test_metrics_csv_path_is_checked_before_evaluating(tmp_path, monkeypatch):
    """``hermes evaluate --out``: a folder takes metrics_<split>.csv, an earlier metrics CSV is
    replaced, any other file (a dataset.json...) is refused before hours of evaluation."""
    from hermes.training.commands import metrics_path
    from hermes.training.evaluate import METRIC_FIELDS

    monkeypatch.chdir(tmp_path)
    assert metrics_path(None, "val") == Path("metrics_val.csv")
    assert metrics_path(str(tmp_path), "test") == tmp_path / "metrics_test.csv"
    earlier = tmp_path / "m.csv"
    earlier.write_text(",".join(METRIC_FIELDS) + "\nds,c,t,1,1,0,5,5\n")
    assert metrics_path(str(earlier), "val") == earlier
    (tmp_path / "dataset.json").write_text('{"labels": {}}')
    with pytest.raises(FileExistsError, match="is not a metrics CSV"):
        metrics_path(str(tmp_path / "dataset.json"), "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics_path(str(tmp_path / "nowhere" / "m.csv"), "val")


def test_evaluate_folder_scores_predictions_by_structure_name(tmp_path, capsys):
    """nnUNetv2_evaluate_folder's job: flat label files (the ground truth's values) and
    `hermes segment` outputs (their own values, names in labels.json) scored against the
    ground truth by structure name; Dice against the formula; problems named by case."""
    import json as js

    from hermes.cli import main
    from hermes.data.io import save_image
    from hermes.training.evaluate_folder import evaluate_folder

    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    gt_dir, flat, hermes_out = tmp_path / "labelsTs", tmp_path / "flat", tmp_path / "seg"
    (tmp_path / "dataset.json").write_text(js.dumps(
        {"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    truth = {}
    for case in ("a", "b"):
        gt = np.zeros((20, 18, 10), np.uint8)
        gt[3:12, 4:10, 2:7] = 1
        gt[14:18, 2:8, 3:8] = 2
        pred = gt.copy()
        pred[rng.random(gt.shape) < 0.05] = 0  # a few voxels lost
        pred[12, 4:10, 2:7] = 1  # one slab too many
        save_image(gt_dir / f"{case}.nii.gz", gt, aff)
        save_image(flat / f"{case}.nii.gz", pred, aff)
        own = np.where(pred == 1, 2, np.where(pred == 2, 1, 0)).astype(np.uint8)
        save_image(hermes_out / case / "labels.nii.gz", own, aff)
        (hermes_out / case / "labels.json").write_text(js.dumps(
            {"labels": {"0": "background", "1": "ds/spleen", "2": "liver"}}))
        truth[case] = (gt, pred)
    for pred_dir in (flat, hermes_out):
        res = evaluate_folder(gt_dir, pred_dir, progress=False)
        assert {(r["case"], r["task"]) for r in res.rows} == {
            (c, t) for c in "ab" for t in ("liver", "spleen")}
        for r in res.rows:
            gt, pred = truth[r["case"]]
            v = {"liver": 1, "spleen": 2}[r["task"]]
            a, b = pred == v, gt == v
            assert r["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
            assert r["dataset"] == tmp_path.name  # labelsTs: its dataset folder's name
    # names differ in case only: matched; a name two datasets share: refused by name; a name
    # missing: warned about and scored as missed; an unfinished save: named
    names_b = hermes_out / "b" / "labels.json"
    kept = names_b.read_text()
    names_b.write_text(js.dumps({"labels": {"0": "background", "1": "Spleen", "2": "LIVER"}}))
    assert [r["dice"] for r in evaluate_folder(gt_dir, hermes_out, progress=False).rows] == \
        [r["dice"] for r in evaluate_folder(gt_dir, flat, progress=False).rows]
    names_b.write_text(js.dumps({"labels": {"1": "d1/spleen", "2": "d1/liver", "3": "d2/liver"}}))
    with pytest.raises(ValueError, match="'liver' matches d1/liver, d2/liver"):
        evaluate_folder(gt_dir, hermes_out, progress=False)
    names_b.write_text(js.dumps({"labels": {"1": "spleen"}}))
    with pytest.warns(UserWarning, match="do not name .*: liver"), \
            pytest.warns(UserWarning, match=r"does not name .*labels.nii.gz: \[2\]"):
        res = evaluate_folder(gt_dir, hermes_out, progress=False)
    assert [r["dice"] for r in res.rows if r["case"] == "b" and r["task"] == "liver"] == [0.0]
    names_b.unlink()
    with pytest.raises(FileNotFoundError, match="case b: .* without labels.json"):
        evaluate_folder(gt_dir, hermes_out, progress=False)
    names_b.write_text(kept)
    # a saved per-structure mask is the whole structure (the label map may hide part of it)
    save_image(hermes_out / "a" / "structures" / "liver.nii.gz",
               (truth["a"][0] == 1).astype(np.uint8), aff)
    liver_a = next(r for r in evaluate_folder(gt_dir, hermes_out, progress=False).rows
                   if (r["case"], r["task"]) == ("a", "liver"))
    assert liver_a["dice"] == 1.0
    shifted = aff.copy()
    shifted[:3, 3] += 5.0  # a mask of another segmentation: refused, not scored
    save_image(hermes_out / "a" / "structures" / "liver.nii.gz",
               (truth["a"][0] == 1).astype(np.uint8), shifted)
    with pytest.raises(ValueError, match=r"liver.nii.gz .* is not on the grid of .*labels"):
        evaluate_folder(gt_dir, hermes_out, progress=False)
    save_image(hermes_out / "a" / "structures" / "liver.nii.gz",
               (truth["a"][0] == 1).astype(np.uint8), aff)
    out = tmp_path / "m.csv"
    assert main(["evaluate-folder", str(gt_dir), str(hermes_out), "--out", str(out), "-q"]) == 0
    assert "liver" in capsys.readouterr().out and out.read_text().startswith("dataset,case")
    (flat / "b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no prediction for case b"):
        evaluate_folder(gt_dir, flat, progress=False)
    only = evaluate_folder(gt_dir, flat, progress=False, predicted_only=True)
    assert {r["case"] for r in only.rows} == {"a"}
    save_image(flat / "b.nii.gz", np.zeros((20, 18, 9), np.uint8), aff)
    with pytest.raises(ValueError, match="case b: prediction .* is not on the grid"):
        evaluate_folder(gt_dir, flat, progress=False)
    # an nnU-Net "ignore" label: predictions there are scored in no metric
    gt_a = truth["a"][0].copy()
    gt_a[0:3] = 9  # unannotated slab, where the prediction below finds "liver"
    save_image(tmp_path / "ign" / "a.nii.gz", gt_a, aff)
    pred_a = truth["a"][1].copy()
    pred_a[0:3] = 1
    save_image(tmp_path / "ign_pred" / "a.nii.gz", pred_a, aff)
    ign = {"background": 0, "liver": 1, "spleen": 2, "ignore": 9}
    row = next(r for r in evaluate_folder(tmp_path / "ign", tmp_path / "ign_pred", labels=ign,
                                          progress=False).rows if r["task"] == "liver")
    a, b = truth["a"][1] == 1, truth["a"][0] == 1
    assert row["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    lone = tmp_path / "elsewhere" / "gt"
    save_image(lone / "a.nii.gz", truth["a"][0], aff)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        evaluate_folder(lone, flat, progress=False)
    res = evaluate_folder(lone, flat, labels=tmp_path / "dataset.json", progress=False)
    assert len(res.rows) == 2


def test_evaluate_folder_refuses_what_is_no_label_map(tmp_path):
    """Fractional or NaN values (a probability map, labels resampled with interpolation) are
    refused by file; values the label map does not name are warned about (scored as
    background); a tolerance that is no positive distance is refused."""
    import json as js

    from hermes.data.io import save_image
    from hermes.training.evaluate_folder import evaluate_folder

    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    (tmp_path / "dataset.json").write_text(js.dumps({"labels": {"background": 0, "liver": 1}}))
    gt = np.zeros((12, 10, 6), np.float32)
    gt[2:8, 2:7, 1:5] = 1.0
    save_image(gt_dir / "a.nii.gz", gt, aff)  # float-typed but integral: a label map
    save_image(pred_dir / "a.nii.gz", gt, aff)
    assert evaluate_folder(gt_dir, pred_dir, progress=False).rows[0]["dice"] == 1.0
    save_image(gt_dir / "B.NII.GZ", gt, aff)  # suffixes in capitals: the case is B
    save_image(pred_dir / "B.NII.GZ", gt, aff)
    rows = evaluate_folder(gt_dir, pred_dir, progress=False).rows
    assert [r["case"] for r in rows] == ["B", "a"] and rows[0]["dice"] == 1.0
    (gt_dir / "B.NII.GZ").unlink()
    for bad, what in ((0.9999, "non-integer values \\(e.g. 0.9999\\)"), (np.nan, "NaN")):
        pred = gt.copy()
        pred[3, 3, 3] = bad
        save_image(pred_dir / "a.nii.gz", pred, aff)
        with pytest.raises(ValueError, match=f"pred/a.nii.gz holds {what}"):
            evaluate_folder(gt_dir, pred_dir, progress=False)
    pred = gt.copy()
    pred[3, 3, 3] = 9
    save_image(pred_dir / "a.nii.gz", pred, aff)
    with pytest.warns(UserWarning, match=r"does not name \(scored as background\): a.nii.gz: "
                                         r"\[9\]"):
        row = evaluate_folder(gt_dir, pred_dir, progress=False).rows[0]
    assert row["pred_voxels"] == int(gt.sum()) - 1
    for tol in (-2.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="tolerance must be a positive distance"):
            evaluate_folder(gt_dir, pred_dir, tolerance_mm=tol, progress=False)
    save_image(gt_dir / "a.nrrd", gt, aff)  # one case in two files: it would count twice
    with pytest.raises(ValueError, match=r"holds cases under several files \(a.nii.gz and "
                                         r"a.nrrd\)"):
        evaluate_folder(gt_dir, pred_dir, progress=False)


def test_model_masks_are_those_hermes_segment_writes(cache):
    """evaluate scores the masks ``hermes.segment`` gives for the case's original image: its
    probabilities mapped back linearly and thresholded (not nearest-neighbour masks)."""
    import hermes
    import hermes.models as hm
    from hermes.models.hermes_resunet import HermesOutput, HermesResUNet
    from hermes.training.evaluate import predict_case

    class VoxelNet(HermesResUNet):
        """Logits voxel-wise from the (normalised) intensity: a cheap model with structure."""

        def forward(self, x, tasks=None, modality=None, **kwargs):  # type: ignore[override]
            seg = torch.stack([(x[:, 0] - 0.3 * i) * 4.0 for i in range(len(tasks))], 1)
            return HermesOutput(seg, torch.zeros(x.shape[0], 1), None, None)

    net = hm.build("tiny", tasks=cache.tasks, modalities=cache.modalities)
    net.__class__ = VoxelNet
    net.hermes_metadata = {"preprocess": cache.params, "train_config": {"crop_size": [32] * 3}}
    case = cache.split("val")[0]
    ours = predict_case(net.eval(), case, (32, 32, 32), overlap=0.5, threshold=0.5)
    res = hermes.segment(case.meta["sources"][0]["path"], model=net, modality=case.modality,
                         tasks=list(case.info.tasks), device="cpu", roi_tolerance=0.0)
    assert res.task_names == list(case.info.tasks)
    for t in range(len(res.task_names)):
        assert 0 < res.masks.count(t) < np.prod(res.shape)  # a structure, not all or nothing
        np.testing.assert_array_equal(ours[t], res.masks[t], err_msg=f"{case.key} {t}")
