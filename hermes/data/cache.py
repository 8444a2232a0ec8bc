"""Reading a preprocessed cache: memory-mapped cases, vocabularies, splits, weights.

``PreprocessedCollection(cache_dir)`` opens what :func:`hermes.data.preprocess` wrote. Arrays
are opened lazily with ``np.load(mmap_mode="r")`` in whichever process touches them first, and
are not pickled, so the objects can be handed to DataLoader workers cheaply.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CachedCase", "DatasetInfo", "PreprocessedCollection", "split_cases"]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as the trainer needs it.

    ``tasks``: global task names; ``task_values[i]``: the label values forming ``tasks[i]``;
    ``task_indices[i]``: index of ``tasks[i]`` in the collection's task vocabulary;
    ``modality_index``: index of ``modality`` in the modality vocabulary;
    ``ignore_values``: label values of unannotated voxels (nnU-Net "ignore"), to mask out.
    """

    name: str
    modality: str
    modality_index: int
    tasks: tuple[str, ...]
    task_values: tuple[tuple[int, ...], ...]
    task_indices: tuple[int, ...]
    weight: float
    ignore_values: tuple[int, ...] = ()


class CacheMismatchError(ValueError):
    """A cached case was made with other settings than its cache records."""


def _case_hashes(params: dict, modalities: set[str]) -> dict[str, str]:
    """``{modality: params_hash}`` that cases of a cache with ``params`` must carry ({} for a
    header these settings cannot be rebuilt from)."""
    from hermes.data.preprocess import PreprocessParams

    try:
        pp = PreprocessParams(params["spacing"], params["image_order"], params["dtype"],
                              params["max_fg_samples"], params["crop_nonzero"],
                              params.get("normalization"))
        return {m: pp.case_hash(m) for m in modalities}
    except (KeyError, TypeError, ValueError):
        return {}


def _open_array(path: Path) -> np.ndarray:
    """Read-only memory map of a cached array; an error naming the file and the fix."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise OSError(f"{path}: cached array unreadable ({exc}); run `hermes preprocess` "
                      "again to rebuild the case") from exc


class CachedCase:
    """One preprocessed case.

    Attributes:
        dataset, case_id, modality: identity.
        info: its :class:`DatasetInfo` (tasks and label values).
        meta: the case JSON (original/canonical geometry, crop, normalisation stats...).
    """

    def __init__(self, cache_dir: Path, meta: dict, info: DatasetInfo):
        self.cache_dir = cache_dir
        self.meta = meta
        self.info = info
        self.dataset: str = meta["dataset"]
        self.case_id: str = meta["case_id"]
        self.modality: str = meta["modality"]
        folder = cache_dir / self.dataset
        self.image_path = folder / meta["files"]["image"]["path"]
        self.label_path = folder / meta["files"]["label"]["path"]
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None
        self._fg: dict[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_image"] = d["_label"] = None  # re-mapped in the receiving process
        return d

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.case_id}"

    @property
    def image(self) -> np.ndarray:
        """Read-only memory map, ``(C, X, Y, Z)`` float32/float16, axes R, A, S."""
        if self._image is None:
            self._image = _open_array(self.image_path)
        return self._image

    @property
    def label(self) -> np.ndarray:
        """Read-only memory map, ``(X, Y, Z)`` uint8/uint16 with the dataset's label values."""
        if self._label is None:
            self._label = _open_array(self.label_path)
        return self._label

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS mm of the cached arrays."""
        return np.asarray(self.meta["affine"], np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])  # type: ignore[return-value]

    @property
    def foreground(self) -> dict[int, np.ndarray]:
        """Sampled voxel coordinates ``(K, 3)`` int64 per label value present in the case."""
        if self._fg is None:
            self._fg = {int(k): np.asarray(v, np.int64).reshape(-1, 3)
                        for k, v in self.meta["foreground"].items()}
        return self._fg

    @property
    def present_values(self) -> list[int]:
        """Label values with at least one voxel in the cached label."""
        return sorted(int(k) for k, n in self.meta["label_counts"].items() if n > 0)

    def task_foreground(self, task: int | str) -> np.ndarray:
        """Sampled foreground coordinates ``(K, 3)`` of one of this dataset's tasks (by local
        index or global name), for foreground oversampling."""
        i = self.info.tasks.index(task) if isinstance(task, str) else task
        parts = [self.foreground[v] for v in self.info.task_values[i] if v in self.foreground]
        return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)

    def task_targets(self, label: np.ndarray | None = None) -> np.ndarray:
        """Binary targets ``(T, ...)`` bool, one per dataset task, from ``label`` (a crop of
        this case's label or the whole label by default)."""
        lab = np.asarray(self.label if label is None else label)
        out = np.empty((len(self.info.task_values), *lab.shape), bool)
        vmax = int(lab.max(initial=0))
        for i, vals in enumerate(self.info.task_values):
            if len(vals) == 1:
                np.equal(lab, vals[0], out=out[i])
            else:
                lut = np.zeros(max(vmax, *vals) + 1, bool)
                lut[list(vals)] = True
                np.take(lut, lab, out=out[i])
        return out

    def ignore_mask(self, label: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of unannotated voxels (the dataset's "ignore" values; all False when
        it has none), for ``label`` or the whole label."""
        lab = np.asarray(self.label if label is None else label)
        if not self.info.ignore_values:
            return np.zeros(lab.shape, bool)
        return np.isin(lab, self.info.ignore_values)

    def crop(self, start: Sequence[int], size: Sequence[int],
             image_pad: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Copy a ``size`` box starting at voxel ``start`` (may extend outside the volume;
        the outside is filled with ``image_pad``, default each channel's minimum, and label
        0). Reads only that box from disk.

        Returns:
            ``(image (C, *size) float32, label (*size) same dtype as the cache)``.
        """
        img, lab = self.image, self.label
        size = [int(s) for s in size]
        out_img = np.empty((img.shape[0], *size), np.float32)
        if image_pad is None:
            pads = self.meta.get("image_min") or [0.0] * img.shape[0]
            out_img[:] = np.asarray(pads, np.float32)[:, None, None, None]
        else:
            out_img[:] = image_pad
        out_lab = np.zeros(size, lab.dtype)
        src, dst = [], []
        for a in range(3):
            s0 = int(start[a])
            lo, hi = max(0, s0), min(lab.shape[a], s0 + size[a])
            if hi <= lo:
                return out_img, out_lab
            src.append(slice(lo, hi))
            dst.append(slice(lo - s0, hi - s0))
        out_img[(slice(None), *dst)] = img[(slice(None), *src)]
        out_lab[tuple(dst)] = lab[tuple(src)]
        return out_img, out_lab

    def __repr__(self) -> str:
        return f"CachedCase({self.key!r}, {self.modality}, shape={self.shape})"


class PreprocessedCollection:
    """A preprocessed collection, opened from its cache folder.

    Attributes:
        cache_dir: the folder.
        tasks: ordered task vocabulary (global names) -> ``hermes.models.build(tasks=...)``.
        modalities: modality vocabulary -> ``hermes.models.build(modalities=...)``.
        datasets: ``{name: DatasetInfo}``.
        cases: every :class:`CachedCase`, datasets in order.
        splits: ``{dataset: {"train": [...], "val": [...], "test": [...]}}`` (case ids).
        sampling_weights: ``{dataset: weight}``, summing to 1.
        params: preprocessing parameters (spacing, orders, dtype...).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir).resolve()
        info_p = self.cache_dir / "collection.json"
        if not info_p.is_file():
            raise FileNotFoundError(f"{info_p} not found: run `hermes preprocess` first "
                                    "(or it did not finish)")
        info = json.loads(info_p.read_text())
        self.name: str = info["name"]
        self.tasks: list[str] = list(info["tasks"])
        self.modalities: list[str] = list(info["modalities"])
        self.params: dict = info["params"]
        self.sampling_weights: dict[str, float] = dict(info["sampling_weights"])
        vocab = {t: i for i, t in enumerate(self.tasks)}
        self.datasets: dict[str, DatasetInfo] = {}
        for d in info["datasets"]:
            self.datasets[d["name"]] = DatasetInfo(
                name=d["name"], modality=d["modality"],
                modality_index=self.modalities.index(d["modality"]),
                tasks=tuple(t["name"] for t in d["tasks"]),
                task_values=tuple(tuple(t["values"]) for t in d["tasks"]),
                task_indices=tuple(vocab[t["name"]] for t in d["tasks"]),
                weight=self.sampling_weights[d["name"]],
                ignore_values=tuple(d.get("ignore_values", ())),
            )
        self.cases: list[CachedCase] = []
        self._by_key: dict[str, CachedCase] = {}
        expected = _case_hashes(self.params, {d.modality for d in self.datasets.values()})
        for ds, ids in info["cases"].items():
            modality = self.datasets[ds].modality
            for cid in ids:
                meta_p = self.cache_dir / ds / f"{cid}.json"
                try:
                    meta = json.loads(meta_p.read_text())
                except (OSError, ValueError) as exc:
                    raise FileNotFoundError(f"{meta_p}: cached case missing or corrupt ({exc});"
                                            " re-run `hermes preprocess`") from exc
                why = (f"cached as {meta.get('modality')!r}, its dataset is {modality!r}"
                       if meta.get("modality") != modality else
                       f"cached with other settings than {info_p.name} records"
                       if expected and meta.get("params_hash") != expected[modality] else None)
                if why:
                    raise CacheMismatchError(f"{meta_p}: {why}; re-run `hermes preprocess` "
                                             "on this cache")
                case = CachedCase(self.cache_dir, meta, self.datasets[ds])
                self.cases.append(case)
                self._by_key[case.key] = case
        self.splits: dict[str, dict[str, list[str]]] = json.loads(
            (self.cache_dir / "splits.json").read_text())["datasets"]

    @property
    def groups(self) -> dict[str, dict]:
        """``{dataset: {"tasks": [...], "modality": ...}}`` for ``hermes.models.build(groups=)``."""
        return {d.name: {"tasks": list(d.tasks), "modality": d.modality}
                for d in self.datasets.values()}

    def case(self, key: str) -> CachedCase:
        """A case by ``"dataset/case_id"``."""
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no case {key!r} in cache {self.cache_dir}") from None

    def split(self, name: str, dataset: str | None = None) -> list[CachedCase]:
        """Cases of split ``name`` (``train``, ``val``, ``test``), optionally of one dataset."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return [self._by_key[f"{ds}/{cid}"] for ds, s in self.splits.items()
                if dataset in (None, ds) for cid in s.get(name, [])
                if f"{ds}/{cid}" in self._by_key]

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (f"PreprocessedCollection({str(self.cache_dir)!r}, cases={len(self.cases)}, "
                f"tasks={len(self.tasks)}, modalities={self.modalities})")


def split_cases(collection, split: str, datasets=None) -> list[CachedCase]:
    """Cases of ``split`` of a collection (:class:`PreprocessedCollection` or any object with
    ``split(name)`` and ``datasets``), only those of ``datasets`` when given.

    Raises:
        ValueError: naming the datasets the collection does not have.
    """
    cases = collection.split(split)
    if datasets is None:
        return cases
    unknown = sorted(set(datasets) - set(collection.datasets))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; the collection has "
                         f"{', '.join(collection.datasets)}")
    return [c for c in cases if c.dataset in datasets]
