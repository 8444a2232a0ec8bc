"""Dataset collections: a YAML file listing MSD/nnU-Net-layout datasets for universal training.

Example ``collection.yaml``::

    name: abdomen_and_brain
    modalities: [US]                 # optional: modalities beyond CT, PET, T1, T2, CINE
    shared_tasks: [liver, kidney]    # structures whose prior is shared by all datasets
    # or a mapping that also unifies differently named labels:
    # shared_tasks: {kidney: [kits/kidney, pet_ds/kidneys]}
    spacing: 1.5                     # optional preprocessing defaults (mm)
    normalization: {CT: {clip: [-1000, 1000]}, T1: {percentiles: [0.5, 99.5]}}
    # (a list per channel: {PET: [CT, PET]} normalises channel 0 of PET images as CT)
    splits: {seed: 0, val_fraction: 0.2}
    datasets:
      - name: liver_ct
        path: raw/Dataset003_Liver   # MSD / nnU-Net raw folder, relative to this YAML
        modality: CT
        labels: {1: liver, 2: tumour}    # optional; default: dataset.json "labels"
                                         # (a label named "ignore" marks unannotated voxels)
        shared: [liver]                  # or `true`: all of this dataset's labels are shared
        weight: 2.0                      # sampling weight (default 1)
        test_cases: [liver_007]          # optional predefined test cases

Task naming: ``liver_ct``'s label ``tumour`` becomes the task ``liver_ct/tumour``; ``liver`` is
shared, so it is the task ``liver`` in every dataset that declares it.

:func:`load_collection` parses without touching image data and never raises for content
problems; :meth:`Collection.validate` returns *every* problem (configuration, missing files,
unreadable files, geometry mismatches, label values outside the map, corrupt or non-finite
image voxels) and
:meth:`Collection.check` raises one :class:`CollectionError` listing them all.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from hermes._text import first_of
from hermes.data.io import IMAGE_SUFFIXES, ImageReadError, image_suffix, load_header, load_image
from hermes.data.io import strip_image_suffix as _strip
from hermes.data.labels import BACKGROUND_NAMES, LabelMapError, background_name, parse_label_map
from hermes.data.modalities import CANONICAL_MODALITIES, UnknownModalityError, canonical_modality

__all__ = [
    "Problem",
    "CollectionError",
    "Case",
    "Task",
    "DatasetSpec",
    "Collection",
    "load_collection",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
_KNOWN_TOP = {
    "name", "modalities", "shared_tasks", "datasets", "spacing", "normalization", "splits",
    "cache_dir", "description",
}
_KNOWN_DS = {
    "name", "path", "modality", "labels", "shared", "weight", "test_cases", "description",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a collection.

    ``kind`` is one of ``config``, ``modality``, ``missing_file``, ``unreadable``, ``geometry``,
    ``label_values``, ``image_values``, ``no_cases``.
    """

    kind: str
    message: str
    dataset: str | None = None
    case: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        where = "/".join(p for p in (self.dataset, self.case) if p)
        loc = f"[{where}] " if where else ""
        return f"{loc}{self.kind}: {self.message}"


class CollectionError(ValueError):
    """Raised with every problem of a collection at once; ``.problems`` holds them."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        head = f"collection {source}" if source else "collection"
        lines = [f"{head} has {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Case:
    """One labelled image of a dataset.

    ``images`` lists one file per channel (nnU-Net ``_0000``, ``_0001``... files) or a single,
    possibly 4D, file (MSD). ``predefined_split`` is ``"test"`` when the dataset says so.
    """

    dataset: str
    case_id: str
    images: tuple[Path, ...]
    label: Path
    predefined_split: str | None = None

    @property
    def key(self) -> str:
        """``"<dataset>/<case_id>"``, unique in a collection."""
        return f"{self.dataset}/{self.case_id}"


@dataclass(frozen=True)
class Task:
    """A segmentation task of one dataset: its local label name, global name and values."""

    local_name: str
    name: str
    values: tuple[int, ...]

    @property
    def shared(self) -> bool:
        return "/" not in self.name


@dataclass
class DatasetSpec:
    """One dataset of a collection (parsed from the YAML and its ``dataset.json``)."""

    name: str
    root: Path
    modality: str
    tasks: list[Task]
    weight: float = 1.0
    cases: list[Case] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)
    unlabelled_test_images: list[Path] = field(default_factory=list)
    ignore_values: tuple[int, ...] = ()

    @property
    def task_names(self) -> list[str]:
        """Global task names of this dataset, in label-map order."""
        return [t.name for t in self.tasks]

    @property
    def label_values(self) -> set[int]:
        """Integer values allowed in this dataset's label files (including 0)."""
        out = {0, *self.ignore_values}
        for t in self.tasks:
            out.update(t.values)
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "modality": self.modality,
            "weight": self.weight,
            "tasks": [
                {"name": t.name, "local_name": t.local_name, "values": list(t.values)}
                for t in self.tasks
            ],
            "channel_names": list(self.channel_names),
            "ignore_values": list(self.ignore_values),
            "num_cases": len(self.cases),
        }


# --------------------------------------------------------------------------------------------
# case discovery
# --------------------------------------------------------------------------------------------


def _resolve_listed_image(root: Path, rel: str) -> tuple[Path, ...]:
    """An MSD ``training[i].image`` path, or its nnU-Net channel files if converted."""
    p = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
    if p.exists():
        return (p,)
    suffix = image_suffix(p) or ""
    stem = _strip(p.name)
    chans = sorted(p.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9]{suffix}"))
    return tuple(chans) if chans else (p,)


def _scan_images(folder: Path, ending: str | None,
                 case_ids: set[str] | None = None) -> dict[str, list[Path]]:
    """Group the images of ``folder`` by case id: the file name without its suffix, for
    images less a nnU-Net ``_XXXX`` channel tag. ``case_ids`` (the label files' ids) keeps
    whole names that are case ids themselves (``amos_0001`` is a case, not channel 1 of
    ``amos``); None (scanning labels) strips no tag."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        suffix = image_suffix(p)
        if suffix is None or p.name.startswith(".") or (ending and suffix != ending):
            continue
        stem = _strip(p.name)
        m = _CHANNEL_RE.match(stem) if case_ids is not None and stem not in case_ids else None
        out.setdefault(m.group("case") if m else stem, []).append(p)
    return out


def _channel_count(case: Case, shapes: Mapping[Path, tuple[int, ...]]) -> int | None:
    """Image channels of a case: the channels of all its files (a 4-D file counts its 4th
    axis), from the header ``shapes`` :func:`_check_case` read; None when a file's header
    could not be read (reported by the per-case checks)."""
    if any(path not in shapes for path in case.images):
        return None
    return sum(int(np.prod(shapes[p][3:], dtype=np.int64)) if len(shapes[p]) > 3 else 1
               for p in case.images)


def _channel_tag(case: Case, path: Path) -> str | None:
    """The nnU-Net channel tag (``"0000"``) of one of ``case``'s image files; None for other
    names (MSD layout, or a file named by the whole case id)."""
    m = _CHANNEL_RE.match(_strip(path.name))
    return m.group("ch") if m is not None and m.group("case") == case.case_id else None


def _channel_tag_problem(case: Case) -> str | None:
    """nnU-Net channel files must be numbered ``_0000`` ... ``_{n-1}`` (a renamed or missing
    file would otherwise shift the channels, or be read in the wrong order)."""
    tags = [_channel_tag(case, path) for path in case.images]
    if None in tags:
        return None  # not nnU-Net channel files
    if len(set(tags)) < len(tags) or [int(t) for t in sorted(tags)] == list(range(len(tags))):
        return None  # (one channel in several files is reported on its own)
    expected = [f"{i:04d}" for i in range(len(tags))]
    return (f"channel files numbered {', '.join(sorted(tags))}; expected {', '.join(expected)} "
            "(one file per channel from _0000, in channel order)")


def _discover_cases(
    name: str, root: Path, meta: Mapping, test_ids: set[str], problems: list[Problem]
) -> tuple[list[Case], list[Path]]:
    ending = meta.get("file_ending")
    if ending is not None and ending not in IMAGE_SUFFIXES:
        problems.append(
            Problem("config", f"unsupported file_ending {ending!r} in dataset.json", name)
        )
    cases: list[Case] = []
    unlabelled: list[Path] = []
    training = meta.get("training")
    if isinstance(training, list) and training and isinstance(training[0], Mapping):
        # MSD layout: explicit (image, label) pairs.
        for i, entry in enumerate(training):
            if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
                problems.append(
                    Problem("config", f"dataset.json training[{i}] lacks image/label", name)
                )
                continue
            image, label = entry["image"], entry["label"]
            channels = [image] if isinstance(image, str) else image
            if not isinstance(label, str) or not isinstance(channels, list) or not channels \
                    or not all(isinstance(c, str) for c in channels):
                problems.append(Problem(
                    "config", f"dataset.json training[{i}] needs a label path and an image path "
                    f"(or a list of one per channel), got {entry!r}", name))
                continue
            label = (root / label).resolve()
            cid = _strip(label.name)
            images = tuple(p for c in channels for p in _resolve_listed_image(root, c))
            cases.append(Case(name, cid, images, label, "test" if cid in test_ids else None))
        n = meta.get("numTraining")
        if isinstance(n, int) and n != len(training) and training:
            problems.append(Problem(
                "config", f"dataset.json numTraining={n} but its training list has "
                f"{len(training)} entries", name))
    else:
        # nnU-Net v2 layout: labelsTr/<case><ending>, imagesTr/<case>_<XXXX><ending>.
        labels = _scan_images(root / "labelsTr", ending)
        images = _scan_images(root / "imagesTr", ending, set(labels))
        for cid in sorted(set(images) | set(labels)):
            if cid not in labels:
                img = images[cid][0]
                problems.append(Problem(
                    "missing_file", f"image {img.name} has no label in labelsTr", name, cid,
                    str(img)))
                continue
            if len(labels[cid]) > 1:  # e.g. a stale a.nii beside a.nii.gz
                problems.append(Problem(
                    "config", f"several label files for one case "
                    f"({', '.join(p.name for p in labels[cid])}): keep one, or set file_ending "
                    "in dataset.json", name, cid))
            lab = labels[cid][0]
            imgs = images.get(cid)
            if not imgs:
                sfx = image_suffix(lab) or ".nii.gz"
                imgs = [root / "imagesTr" / f"{cid}_0000{sfx}"]  # reported as missing later
            stems = [_strip(p.name) for p in imgs]
            twins = [p.name for p, st in zip(imgs, stems, strict=True) if stems.count(st) > 1]
            if twins:  # e.g. a .nrrd copy beside each .nii.gz: read as one more channel
                problems.append(Problem(
                    "config", f"several files for one image channel ({', '.join(twins)}): "
                    "keep one per channel, or set file_ending in dataset.json", name, cid))
            cases.append(Case(name, cid, tuple(imgs), lab, "test" if cid in test_ids else None))
        n = meta.get("numTraining")
        if isinstance(n, int) and n != len(cases) and cases:
            problems.append(Problem(
                "config", f"dataset.json numTraining={n} but {len(cases)} labelled cases found",
                name))
    test = meta.get("test")
    if isinstance(test, list):
        for entry in test:
            if isinstance(entry, Mapping) and "image" in entry and "label" in entry:
                label = (root / entry["label"]).resolve()
                cases.append(Case(name, _strip(label.name),
                                  _resolve_listed_image(root, entry["image"]), label, "test"))
            elif isinstance(entry, str):
                unlabelled.append((root / entry).resolve())
    if isinstance(training, list) and training and isinstance(training[0], Mapping):
        listed = {c.case_id for c in cases}  # the training and labelled test entries
        unlisted = sorted(set(_scan_images(root / "labelsTr", ending)) - listed)
        if unlisted:  # nnU-Net scans the folders: a stale list would drop cases unseen
            problems.append(Problem(
                "config", f"labelsTr holds {len(unlisted)} label(s) that dataset.json's "
                f"training list leaves out ({first_of(unlisted, 4)}): add them to the list "
                "(or move them away)", name))
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            problems.append(Problem("config", "duplicate case id", name, c.case_id))
        seen.add(c.case_id)
    return cases, unlabelled


# --------------------------------------------------------------------------------------------
# per-case deep checks (run in worker processes)
# --------------------------------------------------------------------------------------------


def _affines_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> bool:
    """Close within ``tol`` mm for the origin and ``tol`` relative for the axes."""
    scale = max(1.0, float(np.abs(a[:3, :3]).max()))
    return bool(
        np.allclose(a[:3, :3], b[:3, :3], atol=tol * scale)
        and np.allclose(a[:3, 3], b[:3, 3], atol=max(tol, 1e-2 * scale))
    )


def _missing_channels(case: Case, expected: int) -> str:
    """``: no brats_003_0001.nii.gz`` for a case of nnU-Net channel files lacking some of the
    ``expected`` ones, else an empty string."""
    first = case.images[0]
    if _channel_tag(case, first) is None:
        return ""
    suffix = first.name[len(_strip(first.name)):]
    have = {path.name for path in case.images}
    missing = [f"{case.case_id}_{i:04d}{suffix}" for i in range(expected)
               if f"{case.case_id}_{i:04d}{suffix}" not in have]
    return f": no {first_of(missing, 3)}" if missing else ""


def _check_case(
    case: Case, allowed: frozenset[int], check_labels: bool, check_images: bool = False,
    shapes: dict[Path, tuple[int, ...]] | None = None,
) -> list[Problem]:
    """Every problem of one case: files, geometry, label values and (``check_images``) image
    voxels: readable to the end, finite, not one constant value, as preprocessing needs them.
    The shapes of the headers read are put in ``shapes`` when given."""
    out: list[Problem] = []
    ds, cid = case.dataset, case.case_id
    headers: list[tuple[Path, tuple[int, ...], np.ndarray]] = []
    for p in (*case.images, case.label):
        if not p.is_file():
            what = "label" if p == case.label else "image"
            out.append(Problem("missing_file", f"{what} {p} not found", ds, cid, str(p)))
            continue
        try:
            shape, aff = load_header(p)
            headers.append((p, shape, aff))
            if shapes is not None:
                shapes[p] = shape
        except ImageReadError as exc:
            out.append(Problem("unreadable", str(exc), ds, cid, str(p)))
    if out:
        return out
    label_path, label_shape, label_aff = headers[-1]
    tag_problem = _channel_tag_problem(case)
    if tag_problem:
        out.append(Problem("config", tag_problem, ds, cid, str(case.images[0].parent)))
    if len(label_shape) > 3 and int(np.prod(label_shape[3:])) != 1:
        out.append(Problem("geometry", f"label {label_path.name} has shape {label_shape}, "
                           "expected 3D", ds, cid, str(label_path)))
    for p, shape, aff in headers[:-1]:
        if tuple(shape[:3]) != tuple(label_shape[:3]):
            out.append(Problem(
                "geometry", f"image {p.name} shape {tuple(shape[:3])} != label "
                f"{label_path.name} shape {tuple(label_shape[:3])}", ds, cid, str(p)))
        elif not _affines_close(aff, label_aff):
            diff = float(np.abs(aff - label_aff).max())
            out.append(Problem(
                "geometry", f"image {p.name} and label {label_path.name} affines differ "
                f"(max abs difference {diff:.4g})", ds, cid, str(p)))
    geometry_ok = not any(p.kind == "geometry" for p in out)
    if check_images and geometry_ok:  # the channels match: read their voxels
        from hermes.data.preprocess import _load_channels

        first = str(case.images[0])
        try:
            _load_channels(case)
        except ImageReadError as exc:
            out.append(Problem("unreadable", str(exc), ds, cid, first))
        except ValueError as exc:
            out.append(Problem("image_values", str(exc), ds, cid, first))
    if check_labels and geometry_ok:
        try:
            lab, _ = load_image(label_path)
        except ImageReadError as exc:
            return [*out, Problem("unreadable", str(exc), ds, cid, str(label_path))]
        if np.issubdtype(lab.dtype, np.floating):
            if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
                out.append(Problem("label_values", f"{label_path.name} has non-integer values",
                                   ds, cid, str(label_path)))
                return out
            lab = lab.astype(np.int64)
        if lab.size and lab.min() >= 0 and lab.max() < 1 << 20:  # fast path
            counts = np.bincount(lab.ravel())
            values = np.flatnonzero(counts)
            counts = counts[values]
        else:
            values, counts = np.unique(lab, return_counts=True)
        bad = [(int(v), int(c)) for v, c in zip(values, counts, strict=True)
               if int(v) not in allowed]
        if bad:
            desc = ", ".join(f"{v} ({c} voxels)" for v, c in bad)
            out.append(Problem(
                "label_values", f"{label_path.name} has values not in the label map: {desc}; "
                f"mapped values: {sorted(allowed)}", ds, cid, str(label_path)))
    return out


def _check_case_star(args: tuple) -> tuple[list[Problem], int | None]:
    """``(problems, image channels)`` of one case, each header read once."""
    shapes: dict[Path, tuple[int, ...]] = {}
    problems = _check_case(*args, shapes=shapes)
    return problems, _channel_count(args[0], shapes)


# --------------------------------------------------------------------------------------------
# the collection
# --------------------------------------------------------------------------------------------


class Collection:
    """A parsed dataset collection. Build with :func:`load_collection` or :meth:`from_dict`.

    Attributes:
        name: collection name.
        root: folder that relative dataset paths are resolved against (the YAML's folder).
        path: the YAML file (None when built from a dict).
        datasets: :class:`DatasetSpec` list in YAML order.
        extra_modalities: user-declared modalities beyond the canonical five.
        spacing, normalization, split_seed, val_fraction, cache_dir: settings from the YAML.
    """

    def __init__(self, config: Mapping, root: str | os.PathLike, path: Path | None = None):
        self.root = Path(root).resolve()
        self.path = path
        self._problems: list[Problem] = []
        self._parse(config)

    # ------------------------------------------------------------------ parsing
    def _bad(self, message: str, dataset: str | None = None, kind: str = "config") -> None:
        self._problems.append(Problem(kind, message, dataset))

    def _parse(self, cfg: Mapping) -> None:
        if not isinstance(cfg, Mapping):
            raise CollectionError([Problem("config", "top level of the YAML must be a mapping")],
                                  str(self.path) if self.path else None)
        for k in cfg:
            if k not in _KNOWN_TOP:
                self._bad(f"unknown top-level key {k!r} (known: {', '.join(sorted(_KNOWN_TOP))})")
        self.name = str(cfg.get("name") or (self.path.stem if self.path else "collection"))
        extra = cfg.get("modalities") or []
        if not isinstance(extra, list) or not all(isinstance(m, str) for m in extra):
            self._bad("'modalities' must be a list of names")
            extra = []
        self.extra_modalities: list[str] = []
        for m in extra:
            try:
                canonical_modality(m)  # already canonical or an alias: nothing to declare
            except UnknownModalityError:
                self.extra_modalities.append(m.strip())
        self.spacing = cfg.get("spacing")
        if self.spacing is not None:
            try:
                sp = np.asarray(self.spacing, np.float64)
                if sp.size not in (1, 3) or not np.all(sp > 0):
                    raise ValueError
            except (TypeError, ValueError):
                self._bad(f"'spacing' must be a positive number or 3 of them (mm), "
                          f"got {self.spacing!r}")
                self.spacing = None
        norm = cfg.get("normalization") or {}
        if not isinstance(norm, Mapping):
            self._bad("'normalization' must map modality names to settings")
            norm = {}
        self.normalization = dict(norm)
        splits = cfg.get("splits") or {}
        self.split_seed, self.val_fraction = 0, 0.2
        try:
            self.split_seed = int(splits.get("seed", 0))
            self.val_fraction = float(splits.get("val_fraction", 0.2))
            if not 0.0 <= self.val_fraction < 1.0:
                raise ValueError
        except (AttributeError, TypeError, ValueError):
            self._bad(f"'splits' must be {{seed: int, val_fraction: [0, 1)}}, got {splits!r}")
            self.val_fraction = 0.2
        if isinstance(splits, Mapping):
            for k in splits:
                if k not in ("seed", "val_fraction"):
                    self._bad(f"unknown key {k!r} in 'splits' (known: seed, val_fraction)")
        self.cache_dir = cfg.get("cache_dir")

        # shared structures: global name -> set of references ("name" or "dataset/name")
        shared_cfg = cfg.get("shared_tasks") or {}
        self._shared_refs: dict[str, str] = {}  # reference -> global name
        if isinstance(shared_cfg, list):
            for n in shared_cfg:
                self._shared_refs[str(n)] = str(n)
        elif isinstance(shared_cfg, Mapping):
            for gname, refs in shared_cfg.items():
                refs = refs if isinstance(refs, list) else [refs] if refs else [gname]
                for r in refs:
                    self._shared_refs[str(r)] = str(gname)
        else:
            self._bad("'shared_tasks' must be a list of names or a mapping name -> [refs]")

        datasets = cfg.get("datasets")
        self.datasets: list[DatasetSpec] = []
        if not isinstance(datasets, list) or not datasets:
            self._bad("'datasets' must be a non-empty list")
            datasets = []
        names: set[str] = set()
        for i, dcfg in enumerate(datasets):
            ds = self._parse_dataset(i, dcfg)
            if ds is None:
                continue
            if ds.name in names:
                self._bad(f"duplicate dataset name {ds.name!r}", ds.name)
                continue
            names.add(ds.name)
            self.datasets.append(ds)
        used_refs = {r for r in self._shared_refs}
        for ds in self.datasets:
            for t in ds.tasks:
                used_refs.discard(t.local_name)
                used_refs.discard(f"{ds.name}/{t.local_name}")
        for r in sorted(used_refs):
            self._bad(f"shared_tasks entry {r!r} matches no dataset label")
        # a shared name some dataset spells otherwise (Liver, liver) makes two tasks
        for r in sorted(self._shared_refs):
            near = sorted({t.local_name for ds in self.datasets for t in ds.tasks
                           if t.local_name != r and t.local_name.lower() == r.lower()})
            if near:
                self._bad(f"shared_tasks entry {r!r} is spelled {', '.join(map(repr, near))} "
                          "in some dataset's labels: those stay a task of their own; spell it "
                          "alike (or rename with the dataset's labels: mapping)")
        from hermes.data.normalize import normalization_for

        for ds in self.datasets:
            try:
                spec = normalization_for(ds.modality, self.normalization)
            except (TypeError, ValueError) as exc:
                self._bad(str(exc), ds.name)
                continue
            if isinstance(spec, tuple) and ds.channel_names and \
                    len(spec) != len(ds.channel_names):
                self._bad(f"normalization for {ds.modality} lists {len(spec)} channels, the "
                          f"dataset's images have {len(ds.channel_names)} "
                          f"({', '.join(ds.channel_names)})", ds.name)
            if not isinstance(spec, tuple):
                self._warn_channel_modalities(ds)
        for key in self.normalization:  # a mistyped modality would be silently ignored
            try:
                canonical_modality(str(key), self.extra_modalities)
            except UnknownModalityError as exc:
                self._bad(f"normalization: {exc}")

    def _warn_channel_modalities(self, ds: DatasetSpec) -> None:
        """Warn when dataset.json names channels of modalities normalised otherwise than the
        dataset's (CT and PET of a PET/CT): every channel is normalised as the dataset's unless
        the YAML's ``normalization`` lists one per channel (nnU-Net reads them per channel)."""
        from hermes.data.normalize import normalization_for

        try:  # a dataset without a modality is reported as such
            own = normalization_for(canonical_modality(ds.modality, self.extra_modalities),
                                    self.normalization)
        except (UnknownModalityError, TypeError, ValueError):
            return
        others = []
        for i, channel in enumerate(ds.channel_names):
            try:
                mod = canonical_modality(channel, self.extra_modalities)
                if normalization_for(mod, self.normalization) != own:
                    others.append(f"channel {i} is {channel}")
            except (UnknownModalityError, TypeError, ValueError):
                continue
        if others and len(ds.channel_names) > 1:
            warnings.warn(
                f"dataset {ds.name}: {', '.join(others)} (dataset.json channel_names) but every "
                f"channel is normalised as {ds.modality}; to normalise each as its own, list "
                f"them in the YAML: normalization: {{{ds.modality}: "
                f"[{', '.join(ds.channel_names)}]}}", stacklevel=4)

    def _parse_dataset(self, i: int, dcfg: object) -> DatasetSpec | None:
        if not isinstance(dcfg, Mapping):
            self._bad(f"datasets[{i}] must be a mapping")
            return None
        name = dcfg.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            self._bad(f"datasets[{i}]: 'name' must match {_NAME_RE.pattern} (no '/'), "
                      f"got {name!r}")
            return None
        for k in dcfg:
            if k not in _KNOWN_DS:
                self._bad(f"unknown key {k!r} (known: {', '.join(sorted(_KNOWN_DS))})", name)
        if "path" not in dcfg:
            self._bad("'path' is required", name)
            return None
        root = Path(os.path.expanduser(str(dcfg["path"])))
        root = (root if root.is_absolute() else self.root / root).resolve()
        meta: Mapping = {}
        if not root.is_dir():
            self._problems.append(Problem("missing_file", f"dataset folder {root} not found",
                                          name, path=str(root)))
        else:
            dj = root / "dataset.json"
            if dj.is_file():
                try:
                    meta = json.loads(dj.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    self._problems.append(Problem("unreadable", f"{dj}: {exc}", name,
                                                  path=str(dj)))
                if not isinstance(meta, Mapping):
                    self._problems.append(Problem(
                        "unreadable", f"{dj}: holds a JSON {type(meta).__name__}, not an object "
                        "of dataset fields (labels, channel_names, ...)", name, path=str(dj)))
                    meta = {}
            else:
                self._problems.append(Problem("missing_file", f"{dj} not found", name,
                                              path=str(dj)))
        # modality
        raw_mod = dcfg.get("modality")
        channel_names: list[str] = []
        chan_meta = meta.get("channel_names") or meta.get("modality") or {}
        if isinstance(chan_meta, Mapping):
            channel_names = [str(v) for _, v in sorted(chan_meta.items(), key=lambda kv:
                                                       int(kv[0]) if str(kv[0]).isdigit() else 0)]
        if raw_mod is None:
            if len(set(channel_names)) == 1:
                raw_mod = channel_names[0]
            else:
                named = f" (its channels: {', '.join(channel_names)})" if channel_names else ""
                self._problems.append(Problem(
                    "modality", f"'modality' missing: dataset.json does not name a single one"
                    f"{named}; give the dataset's modality (e.g. `modality: CT`) in a "
                    "collection YAML", name))
                raw_mod = "?"
        modality = str(raw_mod)
        try:
            modality = canonical_modality(str(raw_mod), self.extra_modalities)
        except UnknownModalityError as exc:
            if raw_mod != "?":
                self._problems.append(Problem("modality", str(exc), name))
        # labels
        raw_labels = dcfg.get("labels", meta.get("labels"))
        tasks: list[Task] = []
        ignore_values: tuple[int, ...] = ()
        if raw_labels is None:
            self._bad("no label map: give 'labels' in the YAML or in dataset.json", name)
        else:
            try:
                lmap = parse_label_map(raw_labels)
            except LabelMapError as exc:
                self._bad(f"label map: {exc}", name)
                lmap = {}
            zero = background_name(raw_labels)
            if zero is not None and zero.strip().lower() not in BACKGROUND_NAMES:
                warnings.warn(f"dataset {name}: label value 0 is named {zero!r}, but 0 is the "
                              "background (voxels of no structure): it is not trained as a "
                              "structure; give structures values from 1", stacklevel=2)
            # nnU-Net v2 "ignore" label: unannotated voxels, excluded from every loss
            ignore_values = tuple(v for k in list(lmap) if k.lower() == "ignore"
                                  for v in lmap.pop(k))
            both = sorted({v for vs in lmap.values() for v in vs} & set(ignore_values))
            if both:
                self._bad(f"label map: value(s) {both} are both a structure's and 'ignore' "
                          "(unannotated voxels): give each value one meaning", name)
            shared_flag = dcfg.get("shared", [])
            if shared_flag is True:
                shared_local = set(lmap)
            elif isinstance(shared_flag, list):
                shared_local = {str(s) for s in shared_flag}
                for s in sorted(shared_local - set(lmap)):
                    self._bad(f"'shared' names {s!r}, which is not one of its labels "
                              f"({', '.join(lmap)})", name)
            else:
                self._bad("'shared' must be true or a list of label names", name)
                shared_local = set()
            seen: dict[str, str] = {}
            for local, values in lmap.items():
                if f"{name}/{local}" in self._shared_refs:
                    gname = self._shared_refs[f"{name}/{local}"]
                elif local in self._shared_refs:
                    gname = self._shared_refs[local]
                elif local in shared_local:
                    gname = local
                else:
                    gname = f"{name}/{local}"
                if gname in seen:
                    self._bad(f"labels {seen[gname]!r} and {local!r} both map to task "
                              f"{gname!r}", name)
                    continue
                seen[gname] = local
                tasks.append(Task(local, gname, values))
        weight = dcfg.get("weight", 1.0)
        try:
            weight = float(weight)
            if not np.isfinite(weight) or weight <= 0:
                raise ValueError
        except (TypeError, ValueError):
            self._bad(f"'weight' must be a positive number, got {dcfg.get('weight')!r}", name)
            weight = 1.0
        listed = dcfg.get("test_cases") or []
        # one case may be given alone (`test_cases: a1`), not only as a list
        test_ids = {str(t) for t in ([listed] if isinstance(listed, (str, int)) else listed)}
        cases: list[Case] = []
        unlabelled: list[Path] = []
        if root.is_dir():
            cases, unlabelled = _discover_cases(name, root, meta, test_ids, self._problems)
            if not cases:
                self._problems.append(Problem("no_cases", f"no labelled cases found in {root}",
                                              name, path=str(root)))
            for t in sorted(test_ids - {c.case_id for c in cases}):
                self._bad(f"test_cases names unknown case {t!r}", name)
        return DatasetSpec(name, root, modality, tasks, weight, cases, channel_names, unlabelled,
                           ignore_values)

    @classmethod
    def from_dict(cls, config: Mapping, root: str | os.PathLike = ".") -> Collection:
        """Build from an already-parsed mapping; relative paths resolve against ``root``."""
        return cls(config, root, None)

    # ------------------------------------------------------------------ vocabularies
    @property
    def tasks(self) -> list[str]:
        """Ordered task vocabulary: global task names by first appearance (datasets in order)."""
        out: list[str] = []
        for ds in self.datasets:
            for t in ds.tasks:
                if t.name not in out:
                    out.append(t.name)
        return out

    @property
    def modalities(self) -> list[str]:
        """Modality vocabulary: the five canonical modalities, then declared extra ones.

        Always includes all canonical names (stable prior tables across collections, so
        weights transfer); :attr:`used_modalities` lists only those with data.
        """
        return list(CANONICAL_MODALITIES) + [m for m in self.extra_modalities]

    @property
    def used_modalities(self) -> list[str]:
        """Modalities that at least one dataset has, in vocabulary order."""
        used = {ds.modality for ds in self.datasets}
        return [m for m in self.modalities if m in used]

    @property
    def sampling_weights(self) -> dict[str, float]:
        """Per-dataset sampling weights normalised to sum to 1."""
        total = sum(ds.weight for ds in self.datasets) or 1.0
        return {ds.name: ds.weight / total for ds in self.datasets}

    @property
    def groups(self) -> dict[str, dict]:
        """``{dataset: {"tasks": [...], "modality": ...}}`` for ``hermes.models.build(groups=)``."""
        return {ds.name: {"tasks": ds.task_names, "modality": ds.modality}
                for ds in self.datasets}

    def dataset(self, name: str) -> DatasetSpec:
        for ds in self.datasets:
            if ds.name == name:
                return ds
        raise KeyError(f"no dataset {name!r} in collection {self.name!r} "
                       f"(datasets: {', '.join(d.name for d in self.datasets)})")

    def cases(self) -> list[Case]:
        """All labelled cases, datasets in order."""
        return [c for ds in self.datasets for c in ds.cases]

    def task_indices(self, dataset: str) -> list[int]:
        """Indices into :attr:`tasks` of a dataset's tasks (the prior rows it selects)."""
        vocab = {n: i for i, n in enumerate(self.tasks)}
        return [vocab[t] for t in self.dataset(dataset).task_names]

    # ------------------------------------------------------------------ validation
    def validate(
        self, deep: bool = True, workers: int = 1, progress: bool = False,
        images: bool | None = None,
    ) -> list[Problem]:
        """Every problem of the collection, without raising.

        Args:
            deep: also read every label file to check its values against the label map
                (otherwise only headers are read: existence, readability, geometry).
            images: also read every image to the end: corrupt data, NaN/inf voxels and
                images of one constant value (which preprocessing refuses) are reported up
                front. Default: as ``deep``.
            workers: processes for the per-case checks (1 = in this process).
            progress: show a tqdm progress bar.

        Returns:
            Configuration problems first, then per-case problems in case order.
        """
        problems = list(self._problems)
        jobs = [
            (c, frozenset(ds.label_values), deep, deep if images is None else images)
            for ds in self.datasets for c in ds.cases
        ]
        results: Iterable[tuple[list[Problem], int | None]]
        if workers > 1 and len(jobs) > 1:
            ex = ProcessPoolExecutor(max_workers=workers)
            results = ex.map(_check_case_star, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
        else:
            ex = None
            results = map(_check_case_star, jobs)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(jobs), desc="validating", unit="case")
        counts: dict[str, int | None] = {}
        try:
            for (case, *_), (found, n) in zip(jobs, results, strict=True):
                problems.extend(found)
                counts[case.key] = n
        finally:
            if ex is not None:
                ex.shutdown()
        # channel consistency within a dataset, then across datasets (one model input)
        channels: dict[str, int] = {}
        for ds in self.datasets:
            per_case = {c.case_id: counts[c.key] for c in ds.cases}
            known = [n for n in per_case.values() if n is not None]
            declared = len(ds.channel_names)
            expected = declared or (max(set(known), key=known.count) if known else 0)
            odd = [f"{c.case_id} ({per_case[c.case_id]}{_missing_channels(c, expected)})"
                   for c in ds.cases if per_case[c.case_id] not in (None, expected)]
            if odd:  # one model input: every case needs the same channels
                source = " (dataset.json's channel names)" if declared else ""
                problems.append(Problem(
                    "config", f"{len(odd)} case(s) with another number of image channels than "
                    f"{expected}{source}: {first_of(odd, 5)}",
                    ds.name))
            elif known:
                channels[ds.name] = expected
        if len(set(channels.values())) > 1:
            desc = ", ".join(f"{d}: {n}" for d, n in channels.items())
            problems.append(Problem(
                "config", f"datasets have different numbers of image channels ({desc}); one "
                "model takes one channel count: train them in separate collections"))
        return problems

    def check(self, deep: bool = True, workers: int = 1, progress: bool = False,
              images: bool | None = None) -> None:
        """Raise :class:`CollectionError` listing all problems, if there are any (arguments
        as :meth:`validate`)."""
        problems = self.validate(deep=deep, workers=workers, progress=progress, images=images)
        if problems:
            raise CollectionError(problems, str(self.path) if self.path else self.name)

    # ------------------------------------------------------------------ misc
    def to_dict(self) -> dict:
        """JSON-able summary: vocabularies, datasets with their tasks and weights."""
        return {
            "name": self.name,
            "tasks": self.tasks,
            "modalities": self.modalities,
            "datasets": [ds.to_dict() for ds in self.datasets],
            "sampling_weights": self.sampling_weights,
        }

    def __repr__(self) -> str:
        return (f"Collection({self.name!r}, datasets={len(self.datasets)}, "
                f"cases={len(self.cases())}, tasks={len(self.tasks)})")


def is_dataset_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one dataset's folder (nnU-Net / MSD layout: a ``dataset.json``)."""
    return Path(path).is_dir() and (Path(path) / "dataset.json").is_file()


def load_collection(path: str | os.PathLike) -> Collection:
    """Parse a collection YAML, or one dataset's folder (nnU-Net / MSD layout: modality and
    labels from its ``dataset.json``) as a collection of that dataset alone, named after the
    folder, its tasks named as in the dataset.json (``liver``, not ``Dataset003_Liver/liver``),
    cached by default in ``hermes_cache_<folder name>/`` beside it. Content problems
    are collected, not raised: call :meth:`Collection.check` (or ``validate``) before
    training.

    Raises:
        CollectionError: the file is missing or is not valid YAML.
    """
    path = Path(path).resolve()
    if is_dataset_folder(path):
        config = {"name": path.name, "cache_dir": f"hermes_cache_{path.name}",
                  "datasets": [{"name": path.name, "path": path.name}]}
        try:  # one dataset: its structures keep dataset.json's names (liver, not ds/liver)
            labels = json.loads((path / "dataset.json").read_text())["labels"]
            config["shared_tasks"] = [n for n in parse_label_map(labels) if n.lower() != "ignore"]
        except (OSError, ValueError, KeyError, TypeError, LabelMapError):
            pass  # the dataset's own parsing names the problem
        return Collection(config, path.parent, path)
    if path.is_dir():
        raise CollectionError([Problem(
            "missing_file", f"{path} is a folder without dataset.json: give a collection YAML "
            "or one dataset's folder (with its dataset.json)", path=str(path))])
    if not path.is_file():
        raise CollectionError([Problem("missing_file", f"{path} not found", path=str(path))])
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CollectionError([Problem("config", f"{path}: invalid YAML: {exc}")]) from exc
    return Collection(cfg or {}, path.parent, path)
