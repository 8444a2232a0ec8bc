"""``hermes.segment()``: segment a 3-D image end to end, results on the ORIGINAL voxel grid.

Pipeline: read the image (NIfTI, NRRD, DICOM series folder, nibabel image or array) ->
reorient to RAS, crop to the non-zero region, normalise and resample exactly as in training
(:func:`hermes.data.preprocess.prepare_arrays`) -> sliding-window inference (per-task sigmoid
probabilities on the model grid) -> probabilities resampled LINEARLY back to the original grid
(inverse of the same geometry; outside the cropped region = background) -> per-task masks
(``prob >= threshold``), optional post-processing, label map (``1 + t`` for the smallest
structure ``t`` whose mask holds the voxel, so nested structures stay visible; else 0),
volumes and intensities.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from hermes._text import first_of
from hermes.data.collection import _CHANNEL_RE
from hermes.data.io import (
    ImageReadError,
    image_suffix,
    load_image,
    nifti_affine_mm,
    nifti_data,
    nifti_geometry,
    strip_image_suffix,
)
from hermes.data.normalize import spec_dict
from hermes.data.preprocess import PreprocessParams, prepare_arrays
from hermes.inference.aggregator import _is_int
from hermes.inference.geometry import BackMapper, pad_to_window
from hermes.inference.masks import TaskMasks
from hermes.inference.result import SegmentationResult
from hermes.inference.sparse_probs import SparseProbabilities
from hermes.models.vocabulary import UnknownNameError

__all__ = [
    "DEFAULT_PREPROCESS",
    "ModalityDetectionError",
    "SegmentationInputError",
    "load_input",
    "resolve_model",
    "resolve_tasks",
    "detect_modality",
    "segment",
]

#: Preprocessing used when the checkpoint metadata has no ``"preprocess"`` entry.
DEFAULT_PREPROCESS: dict[str, Any] = {"spacing": [1.5, 1.5, 1.5], "image_order": 3,
                                      "crop_nonzero": True, "normalization": {}}
DEFAULT_ROI = (96, 96, 96)
#: masks from the probabilities kept near each structure only (``SparseProbabilities``); False
#: keeps every task's whole model-grid volume (the earlier way, for benchmarks to compare)
SPARSE_MASKS = True


class SegmentationInputError(ValueError):
    """The image (or an argument) cannot be segmented; the message says why."""


class ModalityDetectionError(ValueError):
    """Automatic modality detection is not confident enough; pass ``modality=``."""


#: What a :class:`ModalityDetectionError` asks of a Python caller (the CLI names its option).
MODALITY_HINT = "pass modality=... explicitly"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _affine_from(affine: Any, spacing: Any) -> np.ndarray:
    if affine is not None:
        a = np.asarray(affine, np.float64)
        if a.shape != (4, 4):
            raise SegmentationInputError(f"affine must be 4x4, got shape {a.shape}")
        return a
    if spacing is not None:
        sp = np.asarray(spacing, np.float64)
        if sp.size not in (1, 3):
            raise SegmentationInputError(f"spacing must be 1 or 3 values (mm), got {spacing}")
        sp = np.broadcast_to(sp.reshape(-1), (3,))
        if np.any(~np.isfinite(sp)) or np.any(sp <= 0):
            raise SegmentationInputError(f"spacing must be 3 positive values, got {spacing}")
        return np.diag([*sp, 1.0])
    raise SegmentationInputError(
        "an array input needs its geometry: pass affine= (4x4 voxel -> RAS mm) or spacing= (mm)"
    )


def input_geometry(image: Any, affine: Any = None) -> dict | None:
    """The NIfTI header geometry (:func:`hermes.data.io.nifti_geometry`) of a NIfTI file or
    nibabel image given to :func:`segment` without an ``affine`` override, else None: the
    written results keep the input's qform/sform codes."""
    if affine is not None:
        return None
    if _is_channel_list(image):
        image = image[0]  # the channel files share one grid (load_input checks it)
    if isinstance(image, (str, os.PathLike)):
        if image_suffix(image) not in (".nii", ".nii.gz"):
            return None
        import nibabel as nib

        return nifti_geometry(nib.load(str(image)))
    return nifti_geometry(image)


def _is_channel_list(image: Any) -> bool:
    """Whether ``image`` is a list/tuple of paths: one file per channel."""
    return isinstance(image, (list, tuple)) and all(
        isinstance(p, (str, os.PathLike)) for p in image)


def _load_channel_files(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray,
                                                                      str]:
    """``(X, Y, Z, C)`` from one 3-D file per channel (nnU-Net's ``case_0000``, ``case_0001``
    ...), every file on the first one's grid."""
    from hermes.data.collection import _affines_close

    if not paths:
        raise SegmentationInputError("an empty list of channel files was given")
    tags = [_CHANNEL_RE.match(strip_image_suffix(Path(p).name)) for p in paths]
    if all(tags) and [t.group("ch") for t in tags] != [f"{i:04d}" for i in range(len(paths))]:
        raise SegmentationInputError(
            f"channel files numbered {', '.join(t.group('ch') for t in tags)}: give them in "
            f"channel order, {', '.join(f'{i:04d}' for i in range(len(paths)))}")
    chans: list[np.ndarray] = []
    first_aff = None
    for path in paths:
        arr, aff, desc = load_input(path)
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise SegmentationInputError(
                f"{desc}: a channel file must hold one 3-D volume, got shape {arr.shape}")
        if chans and arr.shape != chans[0].shape:
            raise SegmentationInputError(
                f"{desc}: shape {arr.shape} differs from {paths[0]} {chans[0].shape}: the "
                "channel files of one image must share its grid")
        if first_aff is None:
            first_aff = aff
        elif not _affines_close(aff, first_aff):
            diff = float(np.abs(aff - first_aff).max())
            raise SegmentationInputError(
                f"{desc}: affine differs from {paths[0]}'s (max abs difference {diff:.4g}): "
                "the channel files of one image must share its grid")
        chans.append(arr)
    desc = f"{paths[0]} (+{len(paths) - 1} channel files)" if len(paths) > 1 else str(paths[0])
    return np.stack(chans, axis=-1), first_aff, desc


def load_input(
    image: Any, affine: Any = None, spacing: Any = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read any supported input as ``(array (X, Y, Z[, C]) float32, affine 4x4, description)``.

    ``image``: a path to a NIfTI/NRRD file or a DICOM series folder, a list of such paths (one
    3-D file per channel, on one grid), a nibabel image (its affine, or ``affine`` instead), or
    a numpy array / torch tensor ``(X, Y, Z[, C])`` with ``affine`` or ``spacing`` (mm). Arrays
    are copied, never modified. Raises :class:`SegmentationInputError` or
    :class:`hermes.data.io.ImageReadError` naming the problem.
    """
    if _is_channel_list(image):
        if affine is not None or spacing is not None:
            raise SegmentationInputError(
                "affine=/spacing= give the geometry of an array input; channel files have "
                "their own")
        return _load_channel_files(image)
    if isinstance(image, (str, os.PathLike)):
        if affine is not None or spacing is not None:
            raise SegmentationInputError(
                f"affine=/spacing= give the geometry of an array input; the file {image} has "
                "its own (edit the file's header, or load it and pass the array)")
        path = Path(image)
        if path.is_dir():
            from hermes.data.dicom import DicomError, load_dicom_series

            try:
                arr, aff = load_dicom_series(path)
            except DicomError as exc:
                images = sorted(p.name for p in path.iterdir() if image_suffix(p) is not None)
                if not images:
                    if not any(p.is_file() for p in path.iterdir()):
                        raise SegmentationInputError(
                            f"{path} holds no files (a DICOM series folder or a folder of "
                            "image files is read, not its subfolders)") from exc
                    raise
                raise SegmentationInputError(  # a folder is read as one DICOM series
                    f"{path} holds no DICOM series but image files ({first_of(images, 3)}"
                    "): give one of them (`hermes segment -i FOLDER` segments them all)"
                ) from exc
        elif path.is_file() and image_suffix(path) is None:
            from hermes.data.dicom import is_dicom_file, load_dicom_series, series_uid_of

            if not is_dicom_file(path):
                raise ImageReadError(
                    f"{path}: not a recognised image (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, "
                    "or a DICOM series folder)"
                )
            arr, aff = load_dicom_series(path.parent, series_uid=series_uid_of(path))
        else:
            arr, aff = load_image(path, dtype=np.float32)
        desc = str(path)
    elif hasattr(image, "affine") and hasattr(image, "dataobj"):  # nibabel image
        if spacing is not None:
            raise SegmentationInputError(
                "spacing= gives the geometry of an array input; a nibabel image has its affine "
                "(pass affine= to override it)")
        arr = nifti_data(image, np.float32, type(image).__name__)
        aff = nifti_affine_mm(image) if affine is None else _affine_from(affine, None)
        desc = f"{type(image).__name__} {tuple(arr.shape)}"
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.is_floating_point() and t.dtype not in (torch.float16, torch.float64):
                t = t.float()  # bfloat16, float8: no NumPy dtype
            arr = t.numpy()
        else:
            arr = image
        if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number)
                                        or arr.dtype == bool):
            raise SegmentationInputError(
                f"cannot segment an array of {arr.dtype} values: pass real intensities (for "
                "complex MR data, e.g. their magnitude np.abs(image))")
        arr = np.array(arr, dtype=np.float32)  # copy: the caller's array is never modified
        aff = _affine_from(affine, spacing)
        desc = f"array {tuple(arr.shape)}"
    else:
        raise SegmentationInputError(
            f"cannot segment a {type(image).__name__}: pass a file path, a DICOM folder, a "
            "nibabel image or an array with affine=/spacing="
        )
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr, aff, desc


def _validate(arr: np.ndarray, affine: np.ndarray, desc: str, in_channels: int,
              channel_files: int = 1) -> np.ndarray:
    """``(C, X, Y, Z)`` from ``(X, Y, Z[, C])`` after the checks every input gets
    (``channel_files``: how many files the input was read from, one per channel)."""
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4 and arr.shape[0] == 1:
        raise SegmentationInputError(
            f"{desc}: image of shape {arr.shape} starts with an axis of 1; Hermes takes "
            "(X, Y, Z) or channel-last (X, Y, Z, C) arrays: for a channel-first (1, X, Y, Z) "
            "tensor pass image[0]")
    if arr.ndim < 3 or (arr.ndim == 3 and min(arr.shape) == 1) or (
            arr.ndim == 4 and min(arr.shape[:3]) == 1):
        dims = min(arr.ndim, sum(n > 1 for n in arr.shape[:3]))
        raise SegmentationInputError(
            f"{desc}: image of shape {arr.shape} is {dims}-D; Hermes segments 3-D volumes "
            "(X, Y, Z with every side >= 2)")
    if arr.ndim > 4:
        raise SegmentationInputError(f"{desc}: expected (X, Y, Z) or (X, Y, Z, C), got "
                                     f"shape {arr.shape}")
    if arr.size == 0:
        raise SegmentationInputError(f"{desc}: image is empty (shape {arr.shape})")
    chans = arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
    if chans.shape[0] != in_channels:
        hint = ""
        if channel_files > 1 and in_channels == 1:
            hint = ("; several files were given as the channels of one image (to segment "
                    "each, give their folder: `hermes segment -i FOLDER`)")
        elif arr.ndim == 4 and (arr.shape[0] == in_channels or arr.shape[0] < arr.shape[3]):
            hint = (f"; shape {arr.shape} looks channel-first: Hermes takes channel-last "
                    "(X, Y, Z, C) arrays (np.moveaxis(image, 0, -1))")
        tag = _CHANNEL_RE.match(strip_image_suffix(Path(desc).name))
        if not hint and tag and chans.shape[0] < in_channels:
            hint = (f"; nnU-Net channel files: give all {in_channels} ({tag.group('case')}_0000 "
                    f"to {tag.group('case')}_{in_channels - 1:04d}) after -i, or their folder")
        n = chans.shape[0]
        raise SegmentationInputError(
            f"{desc}: image has {n} channel{'s' if n != 1 else ''}, the model expects "
            f"{in_channels}"
            + hint)
    n_bad = int(chans.size - np.count_nonzero(np.isfinite(chans)))
    if n_bad:
        raise SegmentationInputError(f"{desc}: image has {n_bad} non-finite (NaN/inf) voxels "
                                     "(or values beyond float32's range, +-3.4e38)")
    if float(chans.max()) == float(chans.min()):
        raise SegmentationInputError(
            f"{desc}: image is empty (every voxel equals {float(chans.min()):g})")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SegmentationInputError(f"{desc}: invalid (singular or non-finite) affine")
    return np.ascontiguousarray(chans)


# --------------------------------------------------------------------------------------------
# model, tasks, modality
# --------------------------------------------------------------------------------------------


def resolve_model(model: Any, device: torch.device) -> tuple[Any, dict]:
    """``(HermesResUNet on device, eval mode; checkpoint metadata)`` from ``model``:
    None (embedded default), a Hermes checkpoint path (or a training run's folder), an official
    ``.pth`` path, or a model."""
    import hermes.models as hm

    if model is None:
        from hermes.models.default import default_model

        model = default_model()
    elif isinstance(model, (str, os.PathLike)):
        path = hm.checkpoint_path(model)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        model = hm.load_model_file(path)
        model.hermes_source = str(path.resolve())  # where it is, whatever the working folder
    if not isinstance(model, hm.HermesResUNet):
        raise TypeError(f"model must be a HermesResUNet, a path or None, got "
                        f"{type(model).__name__}")
    return model.to(device).eval(), dict(getattr(model, "hermes_metadata", {}) or {})


def _group_matches(group_modality: str, modality: str, vocab) -> bool:
    try:
        return vocab.canonical_modality(group_modality) == modality
    except KeyError:
        import re

        tokens = {t.casefold() for t in re.split(r"[^A-Za-z0-9]+", group_modality) if t}
        return modality.casefold() in tokens


def _task_list(tasks: str | Sequence[str]) -> list:
    """The names of ``tasks`` as given: a comma-separated string or a list, stripped.

    Raises:
        SegmentationInputError: ``tasks`` is neither, or holds other things than names.
    """
    if isinstance(tasks, str):
        names = tasks.split(",")
    elif isinstance(tasks, Iterable) and not isinstance(tasks, bytes | Mapping):
        names = list(tasks)
    else:
        raise SegmentationInputError(f"tasks must be task names (a list, or a comma-separated "
                                     f"string), got {type(tasks).__name__} {tasks!r}")
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise SegmentationInputError(f"tasks must be task names (strings), got {odd[0]!r} "
                                     f"({type(odd[0]).__name__})")
    return [n.strip() for n in names]


def _prefixed(vocab, name: str) -> list[str]:
    """The usable tasks named ``<dataset>/name`` (a dataset's own structure kept apart from
    same-named ones of other datasets)."""
    return [t for t in vocab.usable_tasks() if t.endswith("/" + name)]


def resolve_tasks(vocab, tasks: str | Sequence[str] | None, modality: str) -> list[str]:
    """Task names to compute, in the order given (duplicates dropped).

    ``tasks``: None (every task of the dataset groups whose modality is ``modality``; every
    usable task when the groups record no modality), a comma-separated string, or a list of
    task or dataset-group names (a group expands to its tasks; a bare name the model only has
    as one ``<dataset>/name`` means that task).

    Raises:
        hermes.models.UnknownNameError: an unknown name (with close matches).
        SegmentationInputError: no task for ``modality``.
    """
    if tasks is None:
        with_mod = {g: s for g, s in vocab.groups.items() if s.get("modality")}
        if not with_mod:
            return list(vocab.usable_tasks())
        out: list[str] = []
        for spec in with_mod.values():
            if _group_matches(str(spec["modality"]), modality, vocab):
                out.extend(t for t in spec["tasks"] if t not in out and t not in vocab.reserved)
        if not out:
            raise SegmentationInputError(
                f"the model has no task for modality {modality}; its groups cover "
                f"{sorted({str(s['modality']) for s in with_mod.values()})} (pass tasks=)")
        return out
    out = []
    for name in _task_list(tasks):
        if not name:
            continue
        if name not in vocab.tasks and vocab.group_name(name) is not None:
            expanded = vocab.group(name)
        elif name not in vocab.tasks and _prefixed(vocab, name):
            expanded = _prefixed(vocab, name)  # 'head' for the only '<dataset>/head'
            if len(expanded) > 1:
                raise UnknownNameError(f"task {name!r} is ambiguous: {', '.join(expanded)}; "
                                       "pass one of these names")
        else:
            vocab.task_index(name)  # raises UnknownNameError with suggestions
            expanded = [name]
        out.extend(t for t in expanded if t not in out)
    if not out:
        raise SegmentationInputError("no task requested (tasks / --tasks is empty)")
    _warn_other_modality(vocab, out, modality)
    return out


#: An image spanning less than this fraction of the window along an axis (the rest padding on
#: both sides, more than the image itself) gets a warning.
THIN_FRACTION = 1 / 3
_AXES = ("left-right", "anterior-posterior", "inferior-superior")  # the model grid is RAS


def _warn_thin_slab(grid: Sequence[int], roi: Sequence[int], spacing: Any) -> None:
    """Warn when the image is a thin slab of the model's window: a few slices padded on both
    sides look like nothing the model was trained on (an 8-slice crop of a chest CT: lungs
    Dice 0.08, against 0.93 for the same slices segmented within the whole volume)."""
    sp = np.broadcast_to(np.asarray(spacing, float), (3,))
    thin = [f"{g} voxels ({g * s:.0f} mm) {_AXES[a]} against a {r}-voxel window"
            for a, (g, r, s) in enumerate(zip(grid, roi, sp, strict=True))
            if g < THIN_FRACTION * r]
    if thin:
        import warnings

        warnings.warn(f"the image spans only {'; '.join(thin)}: the rest of the window is "
                      "padding, and masks of such a thin slab can be far off; segment the "
                      "whole volume where you have it", stacklevel=4)


def _warn_other_modality(vocab, tasks: list[str], modality: str) -> None:
    """Warn about requested tasks that only dataset groups of other modalities annotate (the
    model never saw them in such images: results may mean nothing)."""
    foreign: dict[str, set[str]] = {}
    for task in tasks:
        groups = [g for g in vocab.groups.values() if task in g.get("tasks", ())]
        if not groups or not all(g.get("modality") for g in groups):
            continue  # a group without a recorded modality may hold any
        mods = {str(g["modality"]) for g in groups}
        if not any(_group_matches(m, modality, vocab) for m in mods):
            foreign[task] = mods
    if foreign:
        import warnings

        listed = ", ".join(f"{t} ({'/'.join(sorted(m))})" for t, m in foreign.items())
        warnings.warn(f"tasks trained on other modalities than {modality}: {listed}; their "
                      "masks in this image may mean nothing", stacklevel=3)


def _center_crop(x: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``(C, X, Y, Z)`` centre crop to at most ``size`` per axis, padded to >= 32."""
    sl = [slice(None)]
    for s in x.shape[1:]:
        a = max(0, (s - size) // 2)
        sl.append(slice(a, a + min(s, size)))
    x = x[tuple(sl)]
    pad = [(0, 0)] + [((32 - s) // 2, 32 - s - (32 - s) // 2) if s < 32 else (0, 0)
                      for s in x.shape[1:]]
    return np.pad(x, pad, constant_values=fill) if any(p != (0, 0) for p in pad) else x


def detect_modality(
    model: Any, chans: np.ndarray, affine: np.ndarray, params: PreprocessParams,
    device: torch.device, crop_size: int = 64, candidates: Sequence[str] | None = None,
) -> tuple[str, float, dict[str, float]]:
    """Detect the image's modality with the model's modality head.

    For every modality ``m`` of the vocabulary (or of ``candidates``, e.g. the MR ones of a
    DICOM series tagged MR) the image is preprocessed as ``m`` (its normalisation), the
    central ``crop_size^3`` region is run once with ``m``'s prior and any task, and
    ``softmax(modality_logits)`` is averaged over these hypotheses, so the answer does not
    hinge on one guessed prior; with ``candidates`` the probabilities are renormalised over
    them.

    Returns:
        ``(modality, confidence in [0, 1], {modality: mean probability})``.
    """
    vocab = model.vocab
    names = list(vocab.modalities) if candidates is None else list(candidates)
    probe = vocab.usable_tasks()[0]
    fast = PreprocessParams(params.spacing, 1, "float32", 0, params.crop_nonzero,
                            params.normalization)
    prepared: dict[str, np.ndarray] = {}
    total = torch.zeros(len(vocab.modalities), dtype=torch.float64)
    with torch.no_grad():
        for m in names:
            key = repr(spec_dict(fast.spec_for(m)))
            if key not in prepared:
                img, _, _ = prepare_arrays(chans, affine, m, fast)
                prepared[key] = _center_crop(img, crop_size, float(img.min()))
            x = torch.from_numpy(np.ascontiguousarray(prepared[key]))[None].to(
                device, _model_dtype(model))
            logits = model.modality_logits(x, tasks=[probe], modality=m)
            total += torch.softmax(logits.float(), -1)[0].double().cpu()
    rows = [vocab.modality_index(m) for m in names]
    mean = total[rows] / total[rows].sum()
    best = int(torch.argmax(mean))
    return names[best], float(mean[best]), {
        m: float(p) for m, p in zip(names, mean.tolist(), strict=True)}


def dicom_modality(image: Any) -> str | None:
    """The DICOM ``Modality`` tag of a DICOM series input of :func:`segment` (a series folder
    or one of its files), else None."""
    if not isinstance(image, (str, os.PathLike)):
        return None
    from hermes.data.dicom import is_dicom_file, series_modality, series_uid_of

    path = Path(image)
    try:
        if path.is_dir():
            return series_modality(path)
        if path.is_file() and image_suffix(path) is None and is_dicom_file(path):
            return series_modality(path.parent, series_uid_of(path))
    except Exception:  # noqa: BLE001 - unreadable headers: detection decides instead
        return None
    return None


def _tagged_modalities(vocab, tag: str | None) -> list[str] | None:
    """The model's modalities a DICOM ``Modality`` tag allows (None: the tag says nothing): CT
    and PT their own; MR every modality but CT and PET (T1, T2, cine, and the MR sequences a
    collection declares, e.g. FLAIR)."""
    from hermes.data.modalities import DICOM_MODALITIES, UnknownModalityError, canonical_modality

    if tag != "MR" and tag not in DICOM_MODALITIES:
        return None

    def canonical(name: str) -> str:
        try:
            return canonical_modality(name)
        except UnknownModalityError:
            return name.upper()
    if tag == "MR":
        return [m for m in vocab.modalities if canonical(m) not in DICOM_MODALITIES.values()]
    return [m for m in vocab.modalities if canonical(m) == DICOM_MODALITIES[tag]]


def _auto_modality(net, chans: np.ndarray, aff: np.ndarray, params: PreprocessParams,
                   dev: torch.device, image: Any, threshold: float) -> dict[str, Any]:
    """``modality="auto"``: the DICOM Modality tag where it decides (CT, PT), else the
    modality head (among the MR modalities for a series tagged MR) -> the detection record
    (``modality``; ``dicom_modality``; ``confidence`` and ``scores`` when detected)."""
    vocab = net.vocab
    tag = dicom_modality(image)
    allowed = _tagged_modalities(vocab, tag)
    if allowed is not None and not allowed:
        raise ModalityDetectionError(
            f"the DICOM series is {tag} (its Modality tag), a modality this model does not "
            f"know; {MODALITY_HINT} (one of {', '.join(vocab.modalities)}) to run it anyway")
    if allowed is not None and len(allowed) == 1:
        return {"modality": allowed[0], "dicom_modality": tag}
    mod, conf, scores = detect_modality(net, chans, aff, params, dev, candidates=allowed)
    if conf < threshold:
        low = float(chans[0].min())
        hint = (f"; its values reach {low:g}, as CT's Hounsfield units do (air -1000)"
                if low <= -500 and allowed is None and "CT" in vocab.modalities else "")
        raise ModalityDetectionError(
            f"modality detection confidence {conf:.2f} for {mod} is below "
            f"{threshold:.2f}; {MODALITY_HINT} (one of {', '.join(allowed or vocab.modalities)})"
            + hint)
    return {"modality": mod, "confidence": conf, "scores": scores,
            **({"dicom_modality": tag} if tag else {})}


# --------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------


def min_voxels(min_ml: float, voxel_ml: float) -> int:
    """Voxels a component needs to hold ``min_ml`` mL (0: keep every one), the ratio rounded to
    1e-6 voxel first: 0.0189 mL of 0.027 uL voxels is 700 voxels, not 701 (its float quotient
    is 700.0000000000005)."""
    return int(np.ceil(round(min_ml / voxel_ml, 6))) if min_ml > 0 else 0


def _postprocess(mask: np.ndarray, largest: bool, min_voxels: int) -> np.ndarray:
    """Keep the largest 26-connected component and/or drop components under ``min_voxels``."""
    if not mask.any() or (not largest and min_voxels <= 1):
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1 and min_voxels <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.zeros(n + 1, bool)
    if largest:
        keep[int(np.argmax(sizes))] = True
    else:
        keep[1:] = True
    keep &= sizes >= max(min_voxels, 1)
    return keep[lab]


def _postprocess_spec(postprocess: Any, tasks: list[str]) -> dict[str, tuple[bool, float]]:
    """``{task: (largest_component, min_volume_ml)}`` from the user's ``postprocess``."""
    def one(spec: Any, where: str) -> tuple[bool, float]:
        if spec in (None, False):
            return False, 0.0
        if spec in (True, "largest"):
            return True, 0.0
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"largest", "min_volume_ml"}
            if unknown:
                raise ValueError(f"postprocess for {where}: unknown keys {sorted(unknown)} "
                                 "(use 'largest', 'min_volume_ml')")
            ml = float(spec.get("min_volume_ml", 0.0))
            if not 0.0 <= ml < float("inf"):
                raise ValueError(f"postprocess for {where}: min_volume_ml (--min-volume-ml) "
                                 f"must be a volume >= 0 mL, got {ml}")
            return bool(spec.get("largest", False)), ml
        raise ValueError(f"postprocess for {where}: expected 'largest', True or a mapping "
                         f"{{'largest': bool, 'min_volume_ml': float}}, got {spec!r}")

    if postprocess is None or postprocess is False:
        return {}
    if isinstance(postprocess, Mapping) and set(postprocess) & {"largest", "min_volume_ml"}:
        return {t: one(postprocess, t) for t in tasks}
    if isinstance(postprocess, Mapping):
        unknown = [t for t in postprocess if t not in tasks]
        if unknown:
            raise ValueError(f"postprocess names tasks that are not segmented: {unknown}")
        return {t: one(s, t) for t, s in postprocess.items()}
    return {t: one(postprocess, t) for t in tasks}


# --------------------------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------------------------


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a model's weights (inputs are cast to it: a float64 or bfloat16
    model raised "expected scalar type ...")."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def window_overlap(overlap: float | None, fast: bool) -> float:
    """The sliding-window overlap :func:`segment` uses: ``overlap``, else 0.5 (0.25 with
    ``fast``)."""
    return (0.25 if fast else 0.5) if overlap is None else float(overlap)


def device_option(text: str) -> str:
    """argparse ``type`` of the commands' ``--device``: ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N`` (any case), refused at parse time otherwise; returned in lower case."""
    import argparse

    value = text.strip().lower()
    if value != "auto":
        try:
            dev = torch.device(value)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(
                f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return value


def overlap_option(text: str) -> float:
    """argparse ``type`` of ``--overlap``: a number in [0, 1)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise SegmentationInputError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SegmentationInputError("device 'cuda' requested but no CUDA device is usable")
    return dev


#: Windows per forward pass by device when ``sw_batch_size`` is None. CPU: 1 (batch-1
#: convolutions run through oneDNN, see :mod:`hermes.ops.conv3d`; two windows were no faster,
#: 16.6 against 14.2 s for a 512 x 512 x 60 CT on 2 cores, and need more memory). GPUs: 2
#: (the window loop is bound by host time there: network time 0.48-0.82 against 1.14-1.63 s
#: for that CT on an H200, embedded model, benchmarks/bench_segment.py --device cuda).
DEFAULT_SW_BATCH = {"cpu": 1, "cuda": 2}


def resolve_sw_batch(sw_batch_size: Any, dev: torch.device) -> int:
    """``sw_batch_size`` checked, or the device's default (:data:`DEFAULT_SW_BATCH`)."""
    if sw_batch_size is None:
        return DEFAULT_SW_BATCH.get(dev.type, 1)
    if not _is_int(sw_batch_size) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    return int(sw_batch_size)


def _preprocess_params(meta: dict, spacing: Any, fast: bool) -> PreprocessParams:
    pre = dict(DEFAULT_PREPROCESS)
    pre.update({k: v for k, v in dict(meta.get("preprocess") or {}).items()
                if k in ("spacing", "image_order", "crop_nonzero", "normalization")})
    if spacing is not None:
        pre["spacing"] = spacing
    order = 1 if fast else int(pre["image_order"])
    return PreprocessParams(pre["spacing"], order, "float32", 0, bool(pre["crop_nonzero"]),
                            pre["normalization"])


def _keeps_user_model(fn: Callable[..., SegmentationResult]) -> Callable[..., SegmentationResult]:
    """A model object passed to ``fn`` gets its training mode and device back afterwards
    (inference switches it to eval mode on the inference device)."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> SegmentationResult:
        model = signature.bind(*args, **kwargs).arguments.get("model")
        if not isinstance(model, torch.nn.Module):
            return fn(*args, **kwargs)
        modes = [(m, m.training) for m in model.modules()]
        first = next(model.parameters(), None)
        device = None if first is None else first.device
        try:
            return fn(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
            if device is not None:
                model.to(device)

    return wrapper


@_keeps_user_model
def segment(
    image: Any,
    tasks: str | Sequence[str] | None = None,
    modality: str = "auto",
    model: Any = None,
    device: str | torch.device = "auto",
    *,
    affine: Any = None,
    spacing: Any = None,
    threshold: float = 0.5,
    probabilities: bool = False,
    postprocess: Any = None,
    fast: bool = False,
    overlap: float | None = None,
    tta: bool | None = None,
    roi_size: int | Sequence[int] | None = None,
    sw_batch_size: int | None = None,
    roi_tolerance: float = 0.125,
    model_spacing: float | Sequence[float] | None = None,
    modality_threshold: float = 0.6,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> SegmentationResult:
    """Segment a 3-D image with a Hermes model; results lie on the image's ORIGINAL grid.

    Args:
        image: a NIfTI (``.nii``/``.nii.gz``) or NRRD path, a DICOM series folder, a list of
            paths (one 3-D file per channel of a multi-channel model, in channel order, e.g.
            nnU-Net's ``case_0000``, ``case_0001``), a nibabel image, or an ``(X, Y, Z[, C])``
            numpy array / torch tensor (then ``affine`` 4x4 voxel -> RAS mm, or ``spacing`` in
            mm, is required). Never modified.
        tasks: task names (or dataset-group names, or ``"a,b"``) from the model's vocabulary;
            only these are computed. None: every task of the modality.
        modality: a modality of the model (``"CT"``, ``"T1"``...) or ``"auto"``: a DICOM
            series' Modality tag (CT, PT: PET) where it decides, else detected with the modality
            head (:func:`detect_modality`; among the MR modalities for a series tagged MR);
            below ``modality_threshold`` it is an error asking for an explicit modality.
        model: None (the embedded default model), a ``.hermes`` checkpoint path, an official
            Hermes ``.pth`` path, or a :class:`hermes.models.HermesResUNet`.
        device: ``"auto"`` (CUDA when usable), ``"cpu"``, ``"cuda"``...
        affine, spacing: geometry of an array input (``affine`` also replaces a nibabel
            image's; a file's geometry is its header's).
        threshold: probability threshold of the masks, in (0, 1).
        probabilities: also return per-task probabilities (float16, original grid; the masks
            threshold the float32 values, so re-thresholding the float16 ones can differ in a
            few voxels whose probability rounds onto the threshold).
        postprocess: per-task clean-up: ``"largest"`` / True (keep the largest connected
            component), ``{"largest": bool, "min_volume_ml": float}`` (also drop components
            under that volume), one of those for every task, or ``{task: spec}``.
        fast: lower-cost mode: window overlap 0.25 (instead of 0.5), linear instead of cubic
            image resampling.
        overlap: sliding-window overlap (default 0.5, 0.25 with ``fast``).
        tta: mirroring test-time augmentation over the 3 axes (8 passes; default off).
        roi_size: window size in voxels (default: the training crop size in the checkpoint
            metadata, else 96).
        roi_tolerance: along an axis of the model grid longer than the window by at most this
            fraction (e.g. 97-108 voxels for a 96 window), one window of the axis' length is
            used instead of two overlapping ones (the network accepts any size; 0 disables).
        sw_batch_size: windows per forward pass; None: 1 on the CPU (batch-1 convolutions run
            through oneDNN, see :mod:`hermes.ops.conv3d`, so 1 is as fast and needs least
            memory), 2 on GPUs (faster: see :data:`DEFAULT_SW_BATCH`; 1 where GPU memory is
            short).
        model_spacing: override the model grid spacing (mm); default from the checkpoint
            metadata ``preprocess.spacing``, else 1.5 mm.
        modality_threshold: minimum confidence of automatic modality detection.
        progress: progress bars on the long steps.
        timings: when a dict is given, seconds per step are stored in it (``load``,
            ``preprocess``, ``inference``, ``writeback``, plus ``modality``).

    Returns:
        :class:`hermes.inference.result.SegmentationResult`.

    Raises:
        SegmentationInputError, hermes.data.io.ImageReadError: bad input (names the problem).
        hermes.models.UnknownNameError: unknown task or modality.
        ModalityDetectionError: automatic detection below ``modality_threshold``.
    """
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 0:
        threshold = threshold.item()
    if not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    for name, flag in (("tta", tta), ("fast", fast), ("probabilities", probabilities),
                       ("progress", progress)):
        if flag is not None and not isinstance(flag, bool | np.bool_) and flag not in (0, 1):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if roi_size is not None:
        sizes = np.asarray(roi_size).reshape(-1)
        if sizes.size not in (1, 3) or not np.issubdtype(sizes.dtype, np.integer) or (
                sizes < 1).any():
            raise ValueError(f"roi_size must be 1 or 3 positive ints (voxels), got {roi_size!r}")
    t_all = time.perf_counter()
    times: dict[str, float] = {} if timings is None else timings
    dev = _resolve_device(device)
    sw_batch_size = resolve_sw_batch(sw_batch_size, dev)

    t0 = time.perf_counter()
    net, meta = resolve_model(model, dev)
    vocab = net.vocab
    arr, aff, desc = load_input(image, affine=affine, spacing=spacing)
    header_geometry = input_geometry(image, affine)
    chans = _validate(arr, aff, desc, int(net.config.in_channels),
                      len(image) if _is_channel_list(image) else 1)
    del arr
    times["load"] = time.perf_counter() - t0

    params = _preprocess_params(meta, model_spacing, fast)
    detection: dict[str, Any] | None = None
    if isinstance(modality, str) and modality.strip().lower() == "auto":
        t0 = time.perf_counter()
        detection = _auto_modality(net, chans, aff, params, dev, image, modality_threshold)
        times["modality"] = time.perf_counter() - t0
        modality = detection["modality"]
    else:
        modality = vocab.canonical_modality(modality)
    task_names = resolve_tasks(vocab, tasks, modality)
    pp = _postprocess_spec(postprocess, task_names)

    t0 = time.perf_counter()
    img, _, geom = prepare_arrays(chans, aff, modality, params)
    times["preprocess"] = time.perf_counter() - t0

    train_cfg = meta.get("train_config") or {}
    roi = roi_size if roi_size is not None else tuple(train_cfg.get("crop_size", DEFAULT_ROI))
    roi = tuple(int(r) for r in np.broadcast_to(np.asarray(roi), (3,)))
    ov = window_overlap(overlap, fast)
    use_tta = (False if tta is None else bool(tta))

    from hermes.inference.sliding_window import sliding_window_inference, window_starts

    grid_shape = tuple(int(s) for s in img.shape[1:])
    train_roi = roi
    _warn_thin_slab(grid_shape, roi, params.spacing)
    # an axis barely longer than the window would need a second, almost fully overlapping window
    # (97 voxels with a 96 window: twice the compute); cover it with one slightly larger window
    roi = tuple(s if r < s <= int(r * (1.0 + roi_tolerance)) else r
                for s, r in zip(grid_shape, roi, strict=True))
    n_windows = len(window_starts([max(s, r) for s, r in zip(grid_shape, roi, strict=True)],
                                  roi, [ov] * 3))
    t0 = time.perf_counter()
    img, inside = pad_to_window(img, roi)  # padded as the training crops are
    x = torch.from_numpy(np.ascontiguousarray(img))[None]
    del img

    dtype = _model_dtype(net)

    def predictor(w: torch.Tensor) -> torch.Tensor:  # float32 logits of a model of any dtype
        return net(w.to(dtype), tasks=task_names, modality=modality).seg_logits.float()

    # streamed along the axis needing the least accumulator memory (a ring of window depth, not
    # a second C x D x H x W volume), in fresh memory that is freed before the write-back; the
    # masks alone need each task's probabilities near its structure only (SparseProbabilities),
    # the probabilities output all of them
    store = (None if probabilities or not SPARSE_MASKS
             else SparseProbabilities(len(task_names), x.shape[2:], threshold))
    with torch.inference_mode():
        probs = sliding_window_inference(
            x, roi, sw_batch_size, predictor, overlap=ov, mode="gaussian", sw_device=dev,
            device="cpu", progress=progress, output="probs", output_dtype=torch.float32,
            tta=use_tta, streaming=True, stream_axis="auto", reuse_buffers=False,
            plane_sink=None if store is None else store.add,
        )
    if store is None:
        probs = probs[0].numpy()[(slice(None), *inside)]
    else:
        store.finish()
    del x
    times["inference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    back = BackMapper(geom)
    vox_ml = float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
    shape = back.orig_shape
    masks = TaskMasks(shape)  # bounding-box crops, not T x X x Y x Z
    prob_out = np.zeros((len(task_names), *shape), np.float16) if probabilities else None
    labels = np.zeros(shape, np.uint8 if len(task_names) < 255 else np.uint16)
    iterator: Any = range(len(task_names))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="map back", unit="task")
    # one task's probabilities on the original grid, reused (only kept when asked for: else
    # each mask is mapped back inside the box that can hold it)
    p = np.empty(shape, np.float32) if prob_out is not None else None
    for t in iterator:
        if p is not None:
            back(probs[t], order=1, out=p)
            prob_out[t] = p
            box, mask = None, p >= threshold
        else:
            arr = probs[t] if store is None else store.task(t)[inside]
            box, mask = back.threshold_box(arr, threshold)
        largest, min_ml = pp.get(task_names[t], (False, 0.0))
        if mask is not None and (largest or min_ml > 0):
            mask = _postprocess(mask, largest, min_voxels(min_ml, vox_ml))
        masks.append(mask, box)
    del p, probs, store, back  # back: its threshold_box buffers
    # label map: where masks overlap the smaller structure wins (grey matter drawn over brain),
    # so nested structures stay visible; painted from the largest volume to the smallest
    for t in sorted(range(len(task_names)), key=lambda i: (-masks.count(i), i)):
        item = masks.box(t)
        if item is not None:
            labels[item[0]][item[1]] = t + 1
    times["writeback"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all

    return SegmentationResult(
        label_map=labels, masks=masks, task_names=task_names, affine=aff,
        nifti_geometry=header_geometry,
        image=chans[0], probabilities=prob_out, modality=modality, detection=detection,
        source=desc, model_source=getattr(net, "hermes_source", None),
        sources=[str(p) for p in image] if _is_channel_list(image) else None,
        settings={"threshold": float(threshold), "overlap": ov, "tta": use_tta, "fast": fast,
                  "tasks_requested": (None if tasks is None else
                                      [str(t) for t in _task_list(tasks) if t]),
                  "roi_size": list(roi), "train_roi_size": list(train_roi),
                  "model_spacing": params.spacing,
                  "model_grid_shape": list(grid_shape), "windows": n_windows,
                  "forward_passes": n_windows * (8 if use_tta else 1),
                  "sw_batch_size": int(sw_batch_size),
                  "image_order": params.image_order, "device": str(dev),
                  "postprocess": {t: {"largest": a, "min_volume_ml": b} for t, (a, b)
                                  in pp.items()}},
        timings=dict(times),
    )


SegmentFn = Callable[..., SegmentationResult]
