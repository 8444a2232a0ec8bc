"""Scoring a folder of segmentations against a folder of ground-truth label maps.

What ``nnUNetv2_evaluate_folder`` does for nnU-Net users, with the metrics of ``hermes
evaluate`` (Dice, NSD, HD95: :func:`hermes.training.evaluate.mask_metrics`): for every ground
truth case ``GT/<case>.nii.gz`` (or ``.nrrd``), the prediction ``PRED/<case>.nii.gz`` or a
``hermes segment`` output folder ``PRED/<case>/labels.nii.gz``. Structures are matched by
name: the ground truth's names from a label map (a ``dataset.json`` beside or above the
folder, or given), a Hermes output's from its ``labels.json`` (any dataset prefix
``ds/liver`` matches ``liver``), a plain label file's from the same label map.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hermes._text import first_of
from hermes.data.io import image_suffix, load_image, spacing_from_affine, strip_image_suffix
from hermes.data.labels import parse_label_map
from hermes.inference.result import unique_filenames
from hermes.training.evaluate import EvaluationResult, check_tolerance, mask_metrics

__all__ = ["evaluate_folder", "ground_truth_labels"]


def ground_truth_labels(gt_dir: Path, labels: str | os.PathLike | Mapping | None
                        ) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """``({name: values}, ignore values)`` of the ground truth: ``labels`` (a mapping, or a
    JSON file such as a dataset.json with a ``labels`` entry), else the ``dataset.json`` in
    ``gt_dir`` or its parent (nnU-Net keeps it beside ``labelsTr``); an nnU-Net ``ignore``
    label marks unannotated voxels, scored in no metric (as ``hermes evaluate`` does)."""
    if labels is None:
        found = [d / "dataset.json" for d in (gt_dir, gt_dir.parent)
                 if (d / "dataset.json").is_file()]
        if not found:
            raise FileNotFoundError(f"no dataset.json in {gt_dir} or {gt_dir.parent}: give the "
                                    "label map with --labels (a dataset.json or a JSON file); "
                                    "the ground truth comes first (evaluate-folder GT PRED)")
        labels = found[0]
    if not isinstance(labels, Mapping):
        try:
            raw = json.loads(Path(labels).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the label map {labels}: {exc}") from None
        labels = raw.get("labels", raw) if isinstance(raw, dict) else raw
    lmap = parse_label_map(labels)
    ignore = tuple(v for n, vs in lmap.items() if n.lower() == "ignore" for v in vs)
    return {n: v for n, v in lmap.items() if n.lower() != "ignore"}, ignore


def _prediction_file(pred_dir: Path, case: str) -> Path | None:
    """``PRED/<case>/labels.nii.gz`` (a Hermes output) or ``PRED/<case>.nii.gz`` (.nii, .nrrd,
    .nhdr), whichever exists; None if neither does."""
    if (pred_dir / case / "labels.nii.gz").is_file():
        return pred_dir / case / "labels.nii.gz"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if (pred_dir / f"{case}{suffix}").is_file():
            return pred_dir / f"{case}{suffix}"
    # a suffix in other letter case (C2.NII.GZ), as the ground truth's may be
    others = sorted(p for p in pred_dir.glob(f"{glob.escape(case)}.*") if p.is_file()
                    and image_suffix(p) is not None and strip_image_suffix(p.name) == case)
    return others[0] if others else None


def _prediction(pred_dir: Path, case: str) -> tuple[Path, dict[str, tuple[int, ...]] | None]:
    """The prediction file of ``case`` and its own label names (a Hermes output's labels.json),
    or None for a plain label file."""
    path = _prediction_file(pred_dir, case)
    if path is None:
        raise FileNotFoundError(f"no prediction for case {case} in {pred_dir} ({case}.nii.gz or "
                                f"{case}/labels.nii.gz); --predicted-only scores the cases "
                                "it holds")
    if path.parent == pred_dir:  # a plain label file
        return path, None
    folder = path.parent
    if not (folder / "labels.json").is_file():
        raise FileNotFoundError(f"case {case}: {folder} holds labels.nii.gz without "
                                "labels.json (a segmentation whose save did not finish)")
    try:
        names = json.loads((folder / "labels.json").read_text())["labels"]
        lmap = parse_label_map({k: v for k, v in names.items() if k != "0"})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"case {case}: cannot read the label names in "
                         f"{folder / 'labels.json'}: {exc}") from None
    return path, lmap


def _match(name: str, lmap: dict[str, tuple[int, ...]]) -> str | None:
    """The name in ``lmap`` of structure ``name`` (case-insensitive; ``ds/name`` task names
    too); None when it names none. Several ``ds/name`` matches are an error naming them."""
    if name in lmap:
        return name
    key = name.casefold()
    same = [n for n in lmap if n.casefold() == key]
    if not same:
        same = [n for n in lmap if n.rsplit("/", 1)[-1].casefold() == key]
    if len(same) > 1:
        raise ValueError(f"structure {name!r} matches {', '.join(same)} of a prediction: give "
                         "the ground truth's label map the same names (--labels)")
    return same[0] if same else None


def _predicted_mask(pred: np.ndarray, pred_aff: np.ndarray, pred_path: Path, name: str,
                    values: tuple[int, ...], pred_map: dict[str, tuple[int, ...]] | None
                    ) -> np.ndarray | None:
    """Structure ``name``'s predicted mask: a Hermes output's own mask file where it saved one
    (``--per-structure``: the whole structure, also where a smaller one covers it in the label
    map; it must lie on the label map's grid ``pred_aff``), else its label values in the label
    map; None when the prediction does not name it."""
    if pred_map is None:
        return np.isin(pred, values)
    found = _match(name, pred_map)
    if found is None:
        return None
    stem = unique_filenames(list(pred_map))[list(pred_map).index(found)]
    own = pred_path.parent / "structures" / f"{stem}.nii.gz"
    if own.is_file():
        mask, aff = load_image(own)
        mask = np.asarray(mask)
        if mask.shape[:3] != pred.shape or mask.size != pred.size or not np.allclose(
                aff, pred_aff, atol=1e-3):
            raise ValueError(f"{own} (shape {mask.shape}) is not on the grid of {pred_path} "
                             f"(shape {pred.shape}): a mask of another segmentation?")
        return mask.reshape(pred.shape) > 0
    return np.isin(pred, pred_map[found])


def _label_map(arr: np.ndarray, path: Path, named: set[int], unnamed: dict[str, set]
                ) -> np.ndarray:
    """``arr`` checked as a label map: NaN, infinite or fractional values are refused (a
    probability map or a resampled label); values ``named`` does not hold (besides 0) are
    collected in ``unnamed[path name]`` (scored as background)."""
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.isfinite(arr).all():
            raise ValueError(f"{path} holds NaN or infinite values: not a label map")
        fractional = arr[arr != np.round(arr)]
        if fractional.size:
            raise ValueError(f"{path} holds non-integer values (e.g. {fractional.flat[0]:g}): "
                             "not a label map (a probability map, or labels resampled with "
                             "interpolation?)")
        arr = arr.astype(np.int64)
    extra = set(np.unique(arr).tolist()) - named - {0}
    if extra:
        unnamed.setdefault(path.name, set()).update(extra)
    return arr


def evaluate_folder(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                    labels: str | os.PathLike | Mapping | None = None,
                    tolerance_mm: float = 2.0, progress: bool = True,
                    predicted_only: bool = False) -> EvaluationResult:
    """Dice, NSD and HD95 of every ground-truth case against its prediction.

    Args:
        gt_dir: folder of ground-truth label maps (``<case>.nii.gz`` ...).
        pred_dir: folder of predictions: ``<case>.nii.gz`` (label values as in the ground
            truth) or ``hermes segment`` outputs ``<case>/labels.nii.gz`` (+ labels.json).
        labels: the ground truth's label map (see :func:`ground_truth_labels`).
        tolerance_mm: NSD tolerance.
        predicted_only: score the cases that have a prediction (nnU-Net's ``-chill``); by
            default a missing prediction is an error.
    Returns:
        :class:`~hermes.training.evaluate.EvaluationResult`, dataset = the ground-truth
        folder's name; a structure the prediction does not name is scored as missed.
    Raises:
        FileNotFoundError, ValueError: a missing prediction or a prediction on another grid,
            naming the case.
    """
    tolerance_mm = check_tolerance(tolerance_mm)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d in (gt_dir, pred_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a folder")
    lmap, ignore = ground_truth_labels(gt_dir, labels)
    files = sorted(p for p in gt_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                   and image_suffix(p) is not None)
    if not files:
        raise FileNotFoundError(f"{gt_dir} holds no label files (.nii.gz, .nii, .nrrd)")
    cases = [(strip_image_suffix(p.name), p) for p in files]
    names: dict[str, list[str]] = defaultdict(list)
    for case, p in cases:
        names[case].append(p.name)
    twice = [" and ".join(ps) for ps in names.values() if len(ps) > 1]
    if twice:
        raise ValueError(f"{gt_dir} holds cases under several files ({first_of(twice, 3)}): "
                         "each would be scored twice; keep one file per case")
    if predicted_only:
        cases = [(case, p) for case, p in cases if _prediction_file(pred_dir, case)]
        if not cases:
            raise FileNotFoundError(f"{pred_dir} holds a prediction of none of the cases of "
                                    f"{gt_dir}")
    found = [_prediction(pred_dir, case) for case, _ in cases]  # all named before scoring
    unnamed = sorted({n for _, pred_map in found if pred_map is not None for n in lmap
                      if _match(n, pred_map) is None})
    if not any(pred_map is None or any(_match(n, pred_map) is not None for n in lmap)
               for _, pred_map in found):
        raise ValueError(f"no structure of the ground truth ({first_of(list(lmap), 5)}) is "
                         "named in the predictions' labels.json files")
    if unnamed:
        warnings.warn(f"structures some predictions do not name (scored as missed there): "
                      f"{first_of(unnamed, 5)}", stacklevel=2)
    dataset = gt_dir.name if gt_dir.name not in ("labelsTr", "labelsTs") else \
        gt_dir.parent.name
    iterator = zip(cases, found, strict=True)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(cases), desc="evaluate", unit="case")
    rows: list[dict] = []
    gt_named = {v for values in lmap.values() for v in values} | set(ignore)
    unknown: dict[str, set] = {}
    for (case, gt_path), (pred_path, pred_map) in iterator:
        gt, gt_aff = load_image(gt_path)
        pred, pred_aff = load_image(pred_path)
        pred_named = gt_named if pred_map is None else {
            v for values in pred_map.values() for v in values}
        gt = _label_map(gt.reshape(gt.shape[:3]), gt_path, gt_named, unknown)
        pred = _label_map(pred.reshape(pred.shape[:3]), pred_path, pred_named, unknown)
        if gt.shape != pred.shape or not np.allclose(gt_aff, pred_aff, atol=1e-3):
            raise ValueError(f"case {case}: prediction {pred_path} (shape {pred.shape}) is not "
                             f"on the grid of {gt_path} (shape {gt.shape}): resample it first")
        spacing = spacing_from_affine(gt_aff)
        annotated = ~np.isin(gt, ignore) if ignore else np.ones(gt.shape, bool)
        for name, values in lmap.items():
            mine = _predicted_mask(pred, pred_aff, pred_path, name, values, pred_map)
            pmask = mine & annotated if mine is not None else np.zeros(gt.shape, bool)
            gmask = np.isin(gt, values)
            rows.append({"dataset": dataset, "case": case, "task": name,
                         **mask_metrics(pmask, gmask, spacing, tolerance_mm),
                         "gt_voxels": int(gmask.sum()), "pred_voxels": int(pmask.sum())})
    if unknown:
        desc = first_of([f"{name}: {sorted(values)}" for name, values in unknown.items()], 5)
        warnings.warn(f"label values the label map does not name (scored as background): "
                      f"{desc}", stacklevel=2)
    return EvaluationResult(rows)
