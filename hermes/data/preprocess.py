"""Preprocess a collection into a memory-mappable case cache (``hermes preprocess``).

Per case: load -> reorient to RAS -> crop to the non-zero region -> normalise intensities
(per modality) -> resample to the target spacing (image: spline/linear; label: nearest) ->
write. Cache layout (``cache_dir``)::

    preprocess.json                  parameters of this cache (a cache holds one setting)
    collection.json                  vocabularies, datasets, tasks, weights (written last)
    splits.json                      train/val/test per dataset (made once, reused)
    <dataset>/<case>_image.npy       float32|float16 (C, X, Y, Z), axes R, A, S, z-scored
    <dataset>/<case>_label.npy       uint8|uint16 (X, Y, Z): the dataset's own label values
    <dataset>/<case>.json            geometry, parameters, statistics, foreground samples,
                                     checksums (written last: marks the case complete)

The source folders are never written to. Every file is written to a temporary name and moved
into place with ``os.replace``; a case whose JSON exists and verifies is skipped on re-runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from hermes._text import first_of
from hermes.data.collection import Case, Collection, _affines_close, load_collection
from hermes.data.geometry import CANONICAL_AXCODES, crop, nonzero_bbox, reorient, resample
from hermes.data.io import axcodes, load_image, spacing_from_affine
from hermes.data.normalize import Specs, normalization_for, normalize, spec_dict
from hermes.data.splits import load_or_create_splits
from hermes.files import (
    atomic_write,
    atomic_write_json,
    folder_lock,
    remove_stale_temporaries,
    sha256_file,
)

__all__ = ["PreprocessError", "PreprocessParams", "preprocess", "preprocess_case",
           "prepare_arrays", "prepare_image", "verify_case", "resolve_cache_dir"]

CACHE_FORMAT = 1


class PreprocessError(RuntimeError):
    """Preprocessing failed for one or more cases (all are listed) or the cache is unusable."""


class PreprocessParams:
    """Settings of one cache. ``spacing`` in mm (one value or per axis X, Y, Z after RAS)."""

    def __init__(self, spacing: float | Sequence[float] = 1.5, image_order: int = 3,
                 dtype: str = "float32", max_fg_samples: int = 500,
                 crop_nonzero: bool = True, normalization: dict | None = None):
        try:
            sp = np.asarray(spacing, np.float64).ravel()
        except (TypeError, ValueError):
            sp = np.zeros(0)
        if sp.size not in (1, 3) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing must be one positive number or three (X, Y, Z), in mm; "
                             f"got {spacing!r}")
        sp = np.broadcast_to(sp, (3,))
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        if image_order not in (0, 1, 2, 3, 4, 5):
            raise ValueError(f"image_order must be a spline order 0..5, got {image_order}")
        self.spacing = [float(s) for s in sp]
        self.image_order = int(image_order)
        self.dtype = dtype
        self.max_fg_samples = int(max_fg_samples)
        self.crop_nonzero = bool(crop_nonzero)
        self.normalization = dict(normalization or {})

    def to_dict(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "spacing": self.spacing,
            "axcodes": list(CANONICAL_AXCODES),
            "image_order": self.image_order,
            "label_order": 0,
            "dtype": self.dtype,
            "max_fg_samples": self.max_fg_samples,
            "crop_nonzero": self.crop_nonzero,
            "normalization": self.normalization,
        }

    def spec_for(self, modality: str) -> Specs:
        return normalization_for(modality, self.normalization)

    def case_hash(self, modality: str) -> str:
        d = self.to_dict()
        d["normalization"] = spec_dict(self.spec_for(modality))
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` to ``path`` atomically; returns the sha256 of the file."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
    return sha256_file(path)


def _source_fingerprint(case: Case) -> list[dict]:
    out = []
    for p in (*case.images, case.label):
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def case_paths(cache_dir: Path, dataset: str, case_id: str) -> tuple[Path, Path, Path]:
    """``(image .npy, label .npy, meta .json)`` of a case in a cache."""
    d = cache_dir / dataset
    return d / f"{case_id}_image.npy", d / f"{case_id}_label.npy", d / f"{case_id}.json"


def verify_case(cache_dir: Path, case: Case, params_hash: str, full: bool = False,
                check_sources: bool = True, modality: str | None = None) -> dict | None:
    """The case's metadata if its cache entry is complete and current, else None.

    Quick verification: JSON readable, same parameters (and ``modality``, where given: MRI
    modalities share a normalisation, so the parameters alone miss a changed one), same source
    files (size, mtime), arrays present with the recorded size, shape and dtype. ``full`` also
    re-hashes the arrays.
    """
    img_p, lab_p, meta_p = case_paths(cache_dir, case.dataset, case.case_id)
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("params_hash") != params_hash:
            return None
        if modality is not None and meta.get("modality") != modality:
            return None
        if check_sources and meta.get("sources") != _source_fingerprint(case):
            return None
        for p, key in ((img_p, "image"), (lab_p, "label")):
            rec = meta["files"][key]
            if p.stat().st_size != rec["bytes"]:
                return None
            arr = np.load(p, mmap_mode="r")
            if list(arr.shape) != rec["shape"] or str(arr.dtype) != rec["dtype"]:
                return None
            if full and sha256_file(p) != rec["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


def _load_channels(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """``(image (C, X, Y, Z) float32, affine)`` from one 4D or several 3D files."""
    chans = []
    affine = None
    for p in case.images:
        arr, aff = load_image(p, dtype=np.float32)
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            raise ValueError(f"{p}: image has {n_bad} non-finite (NaN/inf) voxels (or values "
                             "beyond float32's range, +-3.4e38)")
        if affine is None:
            affine = aff
        if arr.ndim == 3:
            chans.append(arr)
        else:
            chans.extend(np.moveaxis(arr.reshape(arr.shape[:3] + (-1,)), -1, 0))
    image = np.stack(chans)
    if float(image.max()) == float(image.min()):  # refused by hermes.segment too
        raise ValueError(f"{case.images[0]}: image is empty (every voxel equals "
                         f"{float(image.min()):g})")
    return image, affine  # type: ignore[return-value]


def _foreground_samples(label: np.ndarray, n: int, seed: int) -> tuple[dict, dict]:
    """Up to ``n`` voxel coordinates per label value and the voxel count of every value."""
    flat = np.flatnonzero(label)
    vals = label.ravel()[flat]
    rng = np.random.default_rng(seed)
    samples, counts = {}, {}
    for v in np.unique(vals):
        idx = flat[vals == v]
        counts[str(int(v))] = int(idx.size)
        if idx.size > n:
            idx = np.sort(rng.choice(idx, n, replace=False))
        samples[str(int(v))] = np.stack(np.unravel_index(idx, label.shape), 1).tolist()
    return samples, counts


def prepare_arrays(
    image: np.ndarray, affine: np.ndarray, modality: str, params: PreprocessParams,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The preprocessing pipeline on arrays: reorient to RAS, crop to the non-zero region
    (of the image, and of the label when given), normalise, resample.

    Args:
        image: ``(C, X, Y, Z)`` float32 as read (any orientation).
        affine: its voxel -> RAS mm affine.
        label: optional ``(X, Y, Z)`` integer map on the same grid (resampled nearest).

    Returns:
        ``(image (C, X', Y', Z') params.dtype, label (X', Y', Z') or None, geometry)`` where
        ``geometry`` records the original/canonical grids, the crop box, the final affine
        (``"affine"``), shape, spacing and normalisation statistics, enough to map outputs
        back to the original grid (``hermes.inference.geometry.BackMapper(geometry)(pred)``).
    """
    if label is not None and tuple(label.shape[:3]) != tuple(image.shape[1:4]):
        raise ValueError(f"label shape {tuple(label.shape)} does not match the image's grid "
                         f"{tuple(image.shape[1:4])}")
    orig = {
        "affine": np.asarray(affine).tolist(),
        "shape": list(image.shape[1:]),
        "spacing": list(spacing_from_affine(affine)),
        "axcodes": list(axcodes(affine)),
        "channels": int(image.shape[0]),
    }
    image, canon_aff = reorient(image, affine, channel_first=True)
    if label is not None:
        label, _ = reorient(label, affine)
    canon_shape = list(image.shape[1:])
    if params.crop_nonzero:
        mask = np.any(image != 0, axis=0)
        if label is not None:
            mask |= label > 0
        bbox = nonzero_bbox(mask)
        del mask
    else:
        bbox = tuple((0, int(s)) for s in image.shape[1:])
    image, aff = crop(image, canon_aff, bbox, channel_first=True)
    spec = params.spec_for(modality)
    image, stats = normalize(image, spec)
    image, new_aff = resample(image, aff, params.spacing, order=params.image_order)
    if label is not None:
        label, _ = crop(label, canon_aff, bbox)
        label, _ = resample(label, aff, params.spacing, order=0, channel_first=False)
    image = image.astype(params.dtype, copy=False)
    geom = {
        "original": orig,
        "canonical": {"affine": canon_aff.tolist(), "shape": canon_shape,
                      "axcodes": list(CANONICAL_AXCODES)},
        "crop_bbox": [list(b) for b in bbox],
        "affine": new_aff.tolist(),
        "shape": list(image.shape[1:]),
        "spacing": list(spacing_from_affine(new_aff)),
        "normalization": {"spec": spec_dict(spec), "channels": stats},
        "resampling": {"image_order": params.image_order, "label_order": 0},
        "image_min": [float(image[c].min()) for c in range(image.shape[0])],
    }
    return image, label, geom


def prepare_image(
    paths: str | os.PathLike | Sequence[str | os.PathLike], modality: str,
    spacing: float | Sequence[float] = 1.5, image_order: int = 3, dtype: str = "float32",
    normalization: dict | None = None, crop_nonzero: bool = True,
) -> tuple[np.ndarray, dict]:
    """Preprocess a new image for inference exactly as training cases were cached.

    Args:
        paths: one (possibly 4D) file or one file per channel.
        modality: canonical modality name (selects the normalisation).
        spacing, image_order, dtype, normalization, crop_nonzero: as the cache's parameters
            (``PreprocessedCollection.params`` holds them).

    Returns:
        ``(image (C, X, Y, Z), geometry)``; see :func:`prepare_arrays`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    fake = Case("inference", "image", tuple(Path(p) for p in paths), Path(paths[0]))
    image, aff = _load_channels(fake)
    params = PreprocessParams(spacing, image_order, dtype, 0, crop_nonzero, normalization)
    image, _, geom = prepare_arrays(image, aff, modality, params)
    return image, geom


def preprocess_case(case: Case, modality: str, params: PreprocessParams,
                    cache_dir: Path) -> dict:
    """Preprocess one case into ``cache_dir`` and return its metadata (also written as JSON).

    Raises:
        hermes.data.io.ImageReadError, ValueError: with the file/case named.
    """
    t0 = time.perf_counter()
    image, img_aff = _load_channels(case)
    label, lab_aff = load_image(case.label)
    if label.ndim > 3:
        label = label.reshape(label.shape[:3])
    if label.dtype.kind == "f":
        label = np.round(label)
    if label.min() < 0 or label.max() > 65535:
        raise ValueError(f"{case.label}: label values outside 0..65535")
    label = label.astype(np.uint16 if label.max() > 255 else np.uint8)
    if image.shape[1:] != label.shape:
        raise ValueError(f"{case.key}: image shape {image.shape[1:]} != label {label.shape}")
    if not _affines_close(img_aff, lab_aff):  # validate() says so first; checked without it too
        raise ValueError(f"{case.key}: image and label affines differ (max abs difference "
                         f"{float(np.abs(img_aff - lab_aff).max()):.4g}): the label would be "
                         "taken on the image's grid")
    before = np.flatnonzero(np.bincount(label.ravel()))
    image, label, geom = prepare_arrays(image, img_aff, modality, params, label)
    seed = zlib.crc32(case.key.encode())
    fg, counts = _foreground_samples(label, params.max_fg_samples, seed)
    # structures smaller than a voxel of the new grid vanish in nearest resampling
    lost = [int(v) for v in before if v and str(int(v)) not in counts]

    img_p, lab_p, meta_p = case_paths(cache_dir, case.dataset, case.case_id)
    img_p.parent.mkdir(parents=True, exist_ok=True)
    # the JSON marks a finished case: gone while its arrays are replaced, so that a failure
    # half-way leaves no case that looks complete with mismatched arrays (re-run to redo it)
    meta_p.unlink(missing_ok=True)
    files = {}
    for key, p, arr in (("image", img_p, image), ("label", lab_p, label)):
        digest = _atomic_save_npy(p, arr)
        files[key] = {"path": p.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                      "bytes": p.stat().st_size, "sha256": digest}
    meta = {
        "format": CACHE_FORMAT,
        "dataset": case.dataset,
        "case_id": case.case_id,
        "modality": modality,
        "params_hash": params.case_hash(modality),
        "sources": _source_fingerprint(case),
        **geom,
        "label_counts": counts,
        "lost_label_values": lost,
        "foreground": fg,
        "files": files,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(meta_p, meta)
    return meta


def _work(args: tuple) -> tuple[str, str, str | None]:
    case, modality, params, cache_dir, verify_full = args
    h = params.case_hash(modality)
    if verify_case(cache_dir, case, h, full=verify_full, modality=modality) is not None:
        return case.key, "skipped", None
    try:
        preprocess_case(case, modality, params, cache_dir)
    except Exception as exc:  # reported per case; the other cases go on
        return case.key, "failed", f"{type(exc).__name__}: {exc}"
    return case.key, "done", None


# --------------------------------------------------------------------------------------------
# the collection
# --------------------------------------------------------------------------------------------


def resolve_cache_dir(collection: Collection, cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: the argument, else the YAML's ``cache_dir``, else
    ``hermes_cache_<YAML name>/`` next to the YAML (one per YAML: two collections in one folder
    do not share it; a ``hermes_cache/`` of earlier versions holding this collection is kept).
    Refuses any folder inside (or equal to) a dataset's source folder."""
    if cache_dir is None and not collection.cache_dir:
        legacy = collection.root / "hermes_cache"
        stem = collection.path.stem if collection.path else collection.name
        p = legacy if _cache_holds(legacy, collection) is True else \
            collection.root / f"hermes_cache_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"
    elif cache_dir is None:
        p = Path(os.path.expanduser(str(collection.cache_dir)))
        p = p if p.is_absolute() else collection.root / p
    else:
        p = Path(os.path.expanduser(str(cache_dir)))
    p = p.resolve()
    for ds in collection.datasets:
        if p == ds.root or ds.root in p.parents:
            raise PreprocessError(f"cache folder {p} is inside the source folder of dataset "
                                  f"{ds.name!r} ({ds.root}); choose a folder outside it")
        # each dataset is cached in <cache>/<name>: that must not be (or hold) a source folder
        target = p / ds.name
        if target == ds.root or target in ds.root.parents:
            raise PreprocessError(f"cache folder {p} would write dataset {ds.name!r} into its "
                                  f"source folder {ds.root}; choose another cache folder")
    return p


def _same_collection(info: dict, collection: Collection) -> bool:
    """Whether a cache's ``collection.json`` (``info``) is ``collection``'s: the same YAML, or
    the same name and datasets (a moved or renamed YAML, or one built in Python)."""
    source = str(collection.path) if collection.path else None
    if info.get("source") is not None and source is not None and info["source"] == source:
        return True
    return info.get("name") == collection.name and \
        {d.get("name") for d in info.get("datasets", [])} == {d.name for d in collection.datasets}


def _cache_holds(cache: Path, collection: Collection) -> bool | None:
    """Whether the finished cache ``cache`` is ``collection``'s; None when it holds none (or
    an unreadable one)."""
    try:
        info = json.loads((cache / "collection.json").read_text())
        return _same_collection(info, collection)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _check_same_collection(cache: Path, info: dict | None, collection: Collection) -> None:
    """Refuse a cache finished for another collection (``info``: its ``collection.json``; it
    would be replaced, and training on the cache would silently train the collection
    preprocessed last)."""
    if info is None or _same_collection(info, collection):
        return
    old_source = info.get("source")
    raise PreprocessError(
        f"cache {cache} holds another collection ({info.get('name')!r}"
        f"{f' of {old_source}' if old_source else ''}); give this one its own cache "
        "(--cache-dir, or cache_dir: in its YAML), or replace that one (`hermes preprocess "
        "--overwrite`; overwrite=True in Python)")


def preprocess(
    collection: Collection | str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    spacing: float | Sequence[float] | None = None,
    workers: int | None = None,
    progress: bool = True,
    image_order: int = 3,
    dtype: str = "float32",
    max_fg_samples: int = 500,
    crop_nonzero: bool = True,
    validate: bool = True,
    verify_full: bool = False,
    overwrite: bool = False,
    waiting: Callable[[str], object] | None = None,
):
    """Validate and preprocess a collection into a cache; return it opened.

    Args:
        collection: a :class:`Collection` or the path of its YAML.
        cache_dir: destination (see :func:`resolve_cache_dir`).
        spacing: target spacing in mm (default: the YAML's ``spacing``, else 1.5).
        workers: processes (default: ``min(4, os.cpu_count())``).
        progress: tqdm progress bar.
        image_order: image spline order (1 linear, 3 cubic); labels always nearest.
        dtype: cached image dtype, ``"float32"`` or ``"float16"`` (half the I/O).
        max_fg_samples: foreground voxel coordinates stored per label value.
        validate: run :meth:`Collection.check` first (raises listing all problems).
        verify_full: re-hash cached arrays when deciding whether to skip a case.
        overwrite: allow replacing a cache made with different parameters.
        waiting: while another process writes the cache: None refuses
            (:class:`~hermes.files.FolderBusyError`); a function is called with a line saying
            so and the other process is waited for (then its cases are found cached).

    Returns:
        :class:`hermes.data.cache.PreprocessedCollection`.

    Raises:
        CollectionError: validation problems (all of them).
        PreprocessError: the cache folder is unusable, or some cases failed (all listed;
            the others are cached, so a re-run resumes).
    """
    from hermes.data.cache import PreprocessedCollection

    if not isinstance(collection, Collection):
        collection = load_collection(collection)
    workers = workers or min(4, os.cpu_count() or 1)
    if validate:
        # images are read (and their voxels checked) by the preprocessing itself
        collection.check(deep=True, workers=workers, progress=progress, images=False)
    if spacing is None:
        spacing = collection.spacing if collection.spacing is not None else 1.5
    params = PreprocessParams(spacing, image_order, dtype, max_fg_samples, crop_nonzero,
                              collection.normalization)
    for ds in collection.datasets:
        params.spec_for(ds.modality)  # malformed overrides fail before any work
    cache = resolve_cache_dir(collection, cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with folder_lock(cache, "cache folder", waiting):  # one process writes it at a time
        _fill_cache(collection, cache, params, workers, progress, verify_full, overwrite)
    pc = PreprocessedCollection(cache)
    _warn_lost_labels(pc, params.spacing)
    _warn_empty_tasks(pc)
    return pc


def _fill_cache(collection: Collection, cache: Path, params: PreprocessParams, workers: int,
                progress: bool, verify_full: bool, overwrite: bool) -> None:
    """:func:`preprocess`'s work in the (locked) cache folder: check that the cache may be
    written, preprocess the cases not cached yet, and write ``collection.json`` last."""
    header = params.to_dict()
    _check_cache(cache, collection, header, overwrite)
    # before anything changes: stored splits that no longer fit the collection are refused
    load_or_create_splits(collection, cache / "splits.json")
    for folder in (cache, *(cache / ds.name for ds in collection.datasets)):
        remove_stale_temporaries(folder)  # of a run killed while writing
    # collection.json marks a finished run: gone while cases may change, so that an interrupted
    # run (e.g. --overwrite with another spacing) leaves a cache that refuses to open until a
    # re-run finishes, not one mixing two settings
    (cache / "collection.json").unlink(missing_ok=True)
    atomic_write_json(cache / "preprocess.json", header)
    jobs = [(c, ds.modality, params, cache, verify_full)
            for ds in collection.datasets for c in ds.cases]
    t0 = time.perf_counter()
    status = _run_jobs(jobs, workers, progress)
    info = collection.to_dict()
    info["cases"] = {ds.name: [c.case_id for c in ds.cases] for ds in collection.datasets}
    info["params"] = header
    info["source"] = str(collection.path) if collection.path else None
    info["stats"] = {**status, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(cache / "collection.json", info)


def _check_cache(cache: Path, collection: Collection, header: dict, overwrite: bool) -> None:
    """Refuse (unless ``overwrite``) a cache made with other parameters than ``header`` or
    for another collection, and files named like the cache's that Hermes did not write."""
    if overwrite:
        return
    old = read_cache_file(cache, "preprocess.json")
    info = read_cache_file(cache, "collection.json")  # refused here if it is not a cache's
    if old is not None and old != header:
        diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
        shown = ", ".join(f"{k} {old.get(k)} there, {header.get(k)} here" for k in diff)
        raise PreprocessError(
            f"cache {cache} was made with different parameters ({shown}); give the cache "
            "folder itself to use it as it is, use another cache folder, the same "
            "settings, or overwrite=True (`hermes preprocess --overwrite`, which "
            "re-preprocesses it)")
    _check_same_collection(cache, info, collection)


#: Keys every Hermes cache's JSON file of that name holds: what tells it from a user's file.
CACHE_FILE_KEYS = {"collection.json": frozenset({"name", "tasks", "modalities", "datasets",
                                                 "params"}),
                   "preprocess.json": frozenset({"format", "spacing", "axcodes"})}


def read_cache_file(cache: Path, name: str) -> dict | None:
    """The cache's ``collection.json`` or ``preprocess.json`` (``name``), None when absent.

    A file of that name that Hermes did not write (not JSON, not an object, or without the
    keys a cache's holds) is refused, naming it: it may be the user's own, and preprocessing
    would replace it."""
    path = cache / name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        problem = (None if isinstance(data, dict) and CACHE_FILE_KEYS[name] <= set(data)
                   else "not the JSON object a cache holds")
    except (OSError, ValueError) as exc:  # also UnicodeDecodeError
        problem = f"unreadable as JSON: {exc}"
    if problem is not None:
        raise PreprocessError(
            f"{path} is not a Hermes cache's {name} ({problem}); it is left as it is: give "
            "another cache folder (--cache-dir), or move the file away (`hermes preprocess "
            "--overwrite` replaces it)")
    return data


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> dict[str, int]:
    """Preprocess the cases of ``jobs`` (arguments of :func:`_work`) in ``workers``
    processes; returns how many were done, skipped (cached already) and failed. Raises
    :class:`PreprocessError` listing every failed case."""
    status: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0}
    failures: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="preprocessing", unit="case")

    def record(key: str, st: str, err: str | None) -> None:
        status[st] += 1
        if err:
            failures.append(f"{key}: {err}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(status, refresh=False)

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            futs = [ex.submit(_work, j) for j in jobs]
            for f in as_completed(futs):
                record(*f.result())
    else:
        for j in jobs:
            record(*_work(j))
    if bar is not None:
        bar.close()
    if failures:
        raise PreprocessError(f"{len(failures)} case(s) failed (the others are cached; "
                              "re-run to resume):\n  " + "\n  ".join(sorted(failures)))
    return status


def _warn_empty_tasks(pc) -> None:
    """Warn about tasks that no cached case of their dataset labels (a declared label value
    that never occurs): they train as all background and cannot be evaluated."""
    voxels: dict[tuple[str, str], int] = {}
    for c in pc.cases:
        counts = c.meta.get("label_counts") or {}
        lost = {int(v) for v in c.meta.get("lost_label_values") or []}  # warned about apart
        for task, values in zip(c.info.tasks, c.info.task_values, strict=True):
            key = (c.dataset, task)
            voxels[key] = voxels.get(key, 0) + sum(
                int(counts.get(str(v), 0)) + (v in lost) for v in values)
    empty = [f"{task} ({ds})" for (ds, task), n in voxels.items() if n == 0]
    if empty:
        warnings.warn(f"tasks that no case labels (check the label map; they train as all "
                      f"background): {first_of(empty, 5)}", stacklevel=3)


def _warn_lost_labels(pc, spacing: list[float]) -> None:
    """Warn about label values that no voxel keeps after resampling (structures smaller than
    a voxel at ``spacing``): they teach nothing and evaluate as misses."""
    lost = [f"{c.key}: {c.meta['lost_label_values']}" for c in pc.cases
            if c.meta.get("lost_label_values")]
    if lost:
        more = f" (and {len(lost) - 5} more cases)" if len(lost) > 5 else ""
        warnings.warn(f"label values that vanish when resampled to {spacing} mm (structures "
                      f"smaller than a voxel): {'; '.join(lost[:5])}{more}", stacklevel=3)
