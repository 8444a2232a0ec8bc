"""The result of :func:`hermes.segment`: label map, per-task masks, statistics, and saving."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hermes.files import atomic_write_bytes, folder_lock, remove_stale_temporaries
from hermes.inference.masks import TaskMasks

__all__ = ["SegmentationResult", "detection_note", "nifti_image", "nifti_bytes", "safe_filename",
           "unique_filenames"]


def nifti_image(array: np.ndarray, affine: np.ndarray,
                geometry: dict | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``array`` on the grid ``affine`` (voxel -> RAS mm), spatial unit mm.

    ``geometry`` (:func:`hermes.data.io.nifti_geometry` of the input) gives the header the
    input's qform and sform with their codes (e.g. 4 = MNI152, or a qform that differs from the
    sform); without it both are ``affine`` with code 1 (scanner).
    """
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64))
    g = geometry or {"qform": img.affine, "qform_code": 1, "sform": img.affine, "sform_code": 1}
    img.set_qform(g["qform"] if g["qform_code"] else None, code=g["qform_code"])
    img.set_sform(g["sform"] if g["sform_code"] else None, code=g["sform_code"])
    img.header.set_xyzt_units("mm")
    return img


class _GzipSink(io.RawIOBase):
    """A write-only file gzip-compressing what is written to it (level 4, no time stamp):
    nibabel writes an image into it one slice at a time, so the uncompressed file is never
    held whole."""

    def __init__(self) -> None:
        super().__init__()
        self._zlib = zlib.compressobj(4, zlib.DEFLATED, 31)  # 31: gzip container
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        self._parts.append(self._zlib.compress(view))
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == self._size:
            return offset
        raise io.UnsupportedOperation("a gzip stream is written front to back")

    def writable(self) -> bool:
        return True

    def compressed(self) -> bytes:
        self._parts.append(self._zlib.flush())
        return b"".join(self._parts)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = True,
                geometry: dict | None = None) -> bytes:
    """:func:`nifti_image` as the bytes of a file (gzip-compressed for ``.nii.gz``: streamed
    slice by slice, without an uncompressed copy)."""
    img = nifti_image(array, affine, geometry)
    if not compress:
        return img.to_bytes()
    sink = _GzipSink()
    img.to_stream(sink)
    return sink.compressed()


def safe_filename(name: str) -> str:
    """A file-name-safe version of a task name (``'bcv/liver' -> 'bcv_liver'``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "structure"


def unique_filenames(names: list[str]) -> list[str]:
    """:func:`safe_filename` of each task name, a name that collides with an earlier one (also
    by case only, for case-insensitive file systems) suffixed with its label value
    (``'a/b'``, ``'a_b'`` -> ``'a_b'``, ``'a_b_2'``)."""
    out: list[str] = []
    taken: set[str] = set()
    for label, name in enumerate(names, start=1):
        base = candidate = safe_filename(name)
        while candidate.casefold() in taken:
            candidate = f"{base}_{label}" if candidate == base else f"{candidate}_{label}"
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


#: Most threads :meth:`SegmentationResult.save` writes files with, and the scratch memory
#: (bytes) they may hold together.
SAVE_THREADS = 4
SAVE_SCRATCH_BYTES = 1 << 30


def save_threads(files: int, scratch_bytes: int) -> int:
    """Threads to write ``files`` files with: at most :data:`SAVE_THREADS`, the usable CPUs,
    and as many as fit :data:`SAVE_SCRATCH_BYTES` at ``scratch_bytes`` per file being made."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(SAVE_THREADS, cpus or 1, files, SAVE_SCRATCH_BYTES // max(scratch_bytes, 1)))


def _write_in_threads(out: Path, files: list[tuple[str, Callable[[], bytes]]],
                      threads: int) -> None:
    """Produce and atomically write ``files`` (``(name in out, () -> bytes)``) in ``threads``
    threads: the gzip compression that dominates releases the GIL. The first failure is raised
    once the files under way are written; the files not started are not written."""

    def write(name: str, produce: Callable[[], bytes]) -> None:
        atomic_write_bytes(out / name, [produce()])

    if threads <= 1:
        for name, produce in files:
            write(name, produce)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="hermes-save")
    try:
        for future in [pool.submit(write, name, produce) for name, produce in files]:
            future.result()
    finally:  # a failure or Ctrl-C: the files under way finish, the others are not started
        pool.shutdown(wait=True, cancel_futures=True)


def save_marker(out: Path, prefix: str = "") -> Path:
    """The file :meth:`SegmentationResult.save` keeps in ``out`` while it writes (its
    presence: a save that did not finish)."""
    return out / f".{prefix}hermes-saving.json"


#: the files of a save besides its per-task folders (``structures/``, ``probabilities/``)
OUTPUT_FILES = ("labels.nii.gz", "labels.json", "statistics.json", "statistics.csv",
                "preview.png")
TASK_FOLDERS = ("structures", "probabilities")


def hermes_labels(out: Path, prefix: str = "") -> dict | None:
    """``out/{prefix}labels.json`` when a Hermes save wrote it (a JSON object with a
    ``labels`` mapping and the save's ``model`` and ``settings`` records), else None (absent,
    unreadable, or the user's own file)."""
    try:
        names = json.loads((out / f"{prefix}labels.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(names, dict) and isinstance(names.get("labels"), dict)
            and "model" in names and isinstance(names.get("settings"), dict)):
        return None
    return names


def own_output(out: Path, prefix: str, name: str) -> Path | None:
    """``out / name`` when ``name`` is a file a save with ``prefix`` writes (one of
    ``OUTPUT_FILES``, or ``<task folder>/<stem>.nii.gz``) and lies in ``out`` itself or its
    real task folder (no symbolic link on the way out of ``out``); else None."""
    parts = Path(str(name)).parts
    if len(parts) == 1 and parts[0] in {prefix + f for f in OUTPUT_FILES}:
        folder = out
    elif (len(parts) == 2 and parts[0] in {prefix + d for d in TASK_FOLDERS}
          and parts[1].endswith(".nii.gz") and not parts[1].startswith(".")):
        folder = out / parts[0]
        if folder.is_symlink():
            return None
    else:
        return None
    return folder / parts[-1]


def input_record(paths: list[str]) -> list[dict[str, Any]]:
    """What identifies the input files (or DICOM folders) of a segmentation: resolved path,
    size in bytes and modification time (ns; for a folder, of its newest file and the bytes
    of its files) of each; ``hermes segment --resume`` compares it."""
    record = []
    for src in paths:
        p = Path(src)
        try:
            files = [q for q in p.iterdir() if q.is_file()] if p.is_dir() else [p]
            stats = [q.stat() for q in files]
        except OSError:
            continue
        record.append({"path": str(p.resolve()), "bytes": sum(st.st_size for st in stats),
                       "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)})
    return record


def detection_note(detection: dict | None) -> str:
    """`` (detected, confidence 0.91)``, `` (DICOM Modality CT)``... for a modality chosen by
    ``modality="auto"``; an empty string for a modality given by the user."""
    if not detection:
        return ""
    parts = []
    if detection.get("dicom_modality"):
        parts.append(f"DICOM Modality {detection['dicom_modality']}")
    if detection.get("confidence") is not None:
        parts.append(f"detected, confidence {detection['confidence']:.2f}")
    return f" ({'; '.join(parts)})"


class SegmentationResult:
    """Segmentation of one image, on the image's ORIGINAL voxel grid (shape and affine).

    Attributes:
        labels: ``(X, Y, Z)`` uint8/uint16 label map: 0 background, ``i + 1`` task
            ``task_names[i]`` (where several masks overlap, the smallest structure, so that
            nested structures stay visible).
        masks: :class:`~hermes.inference.masks.TaskMasks`, one (possibly overlapping) mask per
            task kept as its bounding-box crop: ``masks[t]`` is task ``t``'s ``(X, Y, Z)`` bool
            mask, ``np.asarray(masks)`` the ``(T, X, Y, Z)`` array (a ``(T, X, Y, Z)`` array
            is accepted when building a result).
        probabilities: ``(T, X, Y, Z)`` float16 sigmoid probabilities, or None.
        image: ``(X, Y, Z)`` float32 input intensities (first channel), or None.
        task_names: the tasks, in label order.
        affine: 4x4 voxel -> RAS mm of the original image.
        nifti_geometry: the input NIfTI's qform/sform and codes, which the written NIfTI
            files keep (None: both ``affine`` with code 1).
        modality: the modality used; ``detection`` holds ``{"modality", "confidence",
            "scores"}`` when it was detected automatically, else None.
        settings, timings: how it was computed, seconds per step.
    """

    def __init__(
        self, label_map: np.ndarray, masks: np.ndarray | TaskMasks, task_names: list[str],
        affine: np.ndarray, image: np.ndarray | None = None,
        probabilities: np.ndarray | None = None, modality: str = "",
        detection: dict | None = None, source: str = "", model_source: str | None = None,
        settings: dict | None = None, timings: dict | None = None,
        nifti_geometry: dict | None = None, sources: list[str] | None = None,
    ):
        self.labels = label_map
        self.masks = masks if isinstance(masks, TaskMasks) else TaskMasks.from_dense(masks)
        self.task_names = list(task_names)
        self.affine = np.asarray(affine, np.float64)
        self.nifti_geometry = nifti_geometry
        self.probabilities = probabilities
        self.modality = modality
        self.detection = detection
        self.source = source
        self.sources = list(sources) if sources else ([source] if source else [])
        self.model_source = model_source
        self.settings = dict(settings or {})
        self.timings = dict(timings or {})
        self.image = image  # (X, Y, Z) input intensities (channel 0), for statistics/preview
        self._stats = self._statistics(image)

    # ---------------------------------------------------------------------------- access
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    @property
    def label_names(self) -> dict[int, str]:
        """``{label value: task name}`` (0 = background is not listed)."""
        return {i + 1: n for i, n in enumerate(self.task_names)}

    @property
    def label_image(self) -> nib.Nifti1Image:
        """The label map as a nibabel image with the original affine."""
        return nifti_image(self.labels, self.affine, self.nifti_geometry)

    def mask(self, task: str) -> np.ndarray:
        """``(X, Y, Z)`` bool mask of ``task``."""
        if task not in self.task_names:
            raise KeyError(f"task {task!r} was not segmented; segmented: {self.task_names}")
        return self.masks[self.task_names.index(task)]

    def mask_image(self, task: str) -> nib.Nifti1Image:
        """The mask of ``task`` as a uint8 nibabel image with the original affine."""
        return nifti_image(self.mask(task).astype(np.uint8), self.affine, self.nifti_geometry)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def _statistics(self, image: np.ndarray | None) -> list[dict[str, Any]]:
        out = []
        shown = np.bincount(self.labels.ravel(order="K"), minlength=len(self.task_names) + 1)
        for i, name in enumerate(self.task_names):
            item, n = self.masks.box(i), self.masks.count(i)
            mean = (float(image[item[0]][item[1]].mean(dtype=np.float64))
                    if image is not None and item is not None else None)
            out.append({"label": i + 1, "task": name, "voxels": n,
                        "volume_ml": n * self.voxel_volume_ml, "mean_intensity": mean,
                        "label_map_voxels": int(shown[i + 1])})
        return out

    @property
    def statistics(self) -> list[dict[str, Any]]:
        """Per task: ``label``, ``task``, ``voxels``, ``volume_ml`` (of the mask, mL),
        ``mean_intensity`` (mean of the input image inside the mask, of its first channel for
        multi-channel images; None when empty) and ``label_map_voxels`` (voxels showing this
        label in the label map: fewer than ``voxels`` where a smaller structure lies inside,
        e.g. grey matter within brain; the masks, ``--per-structure``, hold each whole)."""
        return [dict(s) for s in self._stats]

    @property
    def volumes_ml(self) -> dict[str, float]:
        return {s["task"]: s["volume_ml"] for s in self._stats}

    def __repr__(self) -> str:
        mod = self.modality + detection_note(self.detection)
        return (f"SegmentationResult(shape={self.shape}, modality={mod}, "
                f"tasks={self.task_names})")

    # ---------------------------------------------------------------------------- saving
    def save(
        self, directory: str | os.PathLike, per_structure: bool = False,
        probabilities: bool = False, preview: bool = True, prefix: str = "",
    ) -> dict[str, Path]:
        """Write the outputs into ``directory`` (created; each file written atomically).

        Files: ``{prefix}labels.nii.gz`` (multi-label map, original geometry),
        ``{prefix}labels.json`` (label value -> name, modality, settings),
        ``{prefix}statistics.json`` / ``.csv`` (volumes in mL, mean intensities),
        ``{prefix}preview.png`` (three orthogonal slices with overlays, when ``preview``),
        ``{prefix}structures/<task>.nii.gz`` (when ``per_structure``) and
        ``{prefix}probabilities/<task>.nii.gz`` (float16->float32, when ``probabilities`` and
        they were computed).

        The preview, masks and probability maps of an earlier save into ``directory`` (the
        tasks its ``labels.json`` lists) that this call does not rewrite are removed once the
        new files are written, so that the folder describes one segmentation; other files are
        left alone. The input image is never written over or removed: a clash raises
        :class:`FileExistsError` before anything is written. ``labels.json`` is written last
        (an earlier one removed first): it is there only when a save finished.

        Returns:
            ``{kind: path}`` of the files written (per-structure files as ``mask:<task>``).
        """
        out = Path(directory)
        geo = self.nifti_geometry
        files: list[tuple[str, str, Any]] = [  # (key, name, () -> bytes)
            ("labels", f"{prefix}labels.nii.gz",
             lambda: nifti_bytes(self.labels, self.affine, geometry=geo)),
            ("statistics_json", f"{prefix}statistics.json", self._statistics_json),
            ("statistics_csv", f"{prefix}statistics.csv", self._statistics_csv),
        ]
        stems = unique_filenames(list(self.task_names))
        if per_structure:
            for i, name in enumerate(self.task_names):
                files.append((f"mask:{name}", f"{prefix}structures/{stems[i]}.nii.gz",
                              lambda i=i: self._mask_bytes(i, geo)))
        if probabilities and self.probabilities is not None:
            for i, name in enumerate(self.task_names):
                files.append((f"prob:{name}", f"{prefix}probabilities/{stems[i]}.nii.gz",
                              lambda i=i: nifti_bytes(self.probabilities[i].astype(np.float32),
                                                      self.affine, geometry=geo)))
        png = self._preview_or_nothing() if preview else None
        if png is not None:  # else an earlier preview is stale like any unwritten output
            files.append(("preview", f"{prefix}preview.png", lambda: png))
        # last: a labels.json beside the other files marks a finished save (`--resume`)
        files.append(("names", f"{prefix}labels.json", self._names_json))
        self._refuse_input_clash([out / name for _, name, _ in files])
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, "output folder"):  # one save at a time into a folder
            self._write(out, prefix, files, scratch=int(np.prod(self.shape)) * (
                4 if probabilities else 1))  # per file being made: its voxel array
        return {key: out / name for key, name, _ in files}

    def _write(self, out: Path, prefix: str, files: list[tuple[str, str, Any]],
               scratch: int) -> None:
        """:meth:`save`'s writing, holding the folder's lock: ``files`` (labels.json last),
        then the earlier save's files that these do not replace are removed."""
        names = out / f"{prefix}labels.json"
        if (names.exists() or names.is_symlink()) and hermes_labels(out, prefix) is None:
            raise FileExistsError(f"{names} is not a Hermes save's labels.json (no model and "
                                  "settings records): it is left alone; save to another "
                                  "folder or with another prefix")
        written_paths = {(out / name).resolve() for _, name, _ in files}
        stale = [p for p in self._earlier_outputs(out, prefix)
                 if p.resolve() not in written_paths and p.is_file()]
        self._refuse_input_clash(stale)
        for folder in (out, *(out / f"{prefix}{sub}" for sub in TASK_FOLDERS)):
            remove_stale_temporaries(folder)  # left by a save that was killed
        # until labels.json is rewritten, a marker names the files this save writes and
        # replaces: an interrupted save is recognised (`hermes segment --resume`) and the next
        # save into the folder removes what it left
        marker = save_marker(out, prefix)
        touched = sorted({name for _, name, _ in files} | {str(p.relative_to(out)) for p in stale})
        atomic_write_bytes(marker, [json.dumps({"files": touched}).encode()])
        (out / f"{prefix}labels.json").unlink(missing_ok=True)  # unfinished until rewritten
        _write_in_threads(out, [(name, produce) for _, name, produce in files[:-1]],
                          save_threads(len(files) - 1, scratch))
        atomic_write_bytes(out / files[-1][1], [files[-1][2]()])  # labels.json, last
        for p in stale:
            p.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        for sub in TASK_FOLDERS:
            folder = out / f"{prefix}{sub}"
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()

    def _mask_bytes(self, index: int, geo: dict | None) -> bytes:
        """Task ``index``'s mask as ``.nii.gz`` bytes, built in the file's (Fortran) voxel order
        from its crop: nibabel then writes it without a transposing copy (5x faster)."""
        data = np.zeros(self.shape[::-1], np.uint8).T  # (X, Y, Z), Fortran-ordered
        item = self.masks.box(index)
        if item is not None:
            data[item[0]] = item[1]
        return nifti_bytes(data, self.affine, geometry=geo)

    @staticmethod
    def _earlier_outputs(out: Path, prefix: str) -> list[Path]:
        """Files an earlier :meth:`save` with ``prefix`` wrote into ``out``: its preview and the
        masks and maps of the tasks its ``labels.json`` lists (a Hermes one only), and what an
        interrupted save's marker names; only names a save writes, inside ``out``
        (:func:`own_output`): nothing else is touched."""
        listed: list[str] = []
        try:
            marked = json.loads(save_marker(out, prefix).read_text())["files"]
            listed += [str(name) for name in marked] if isinstance(marked, list) else []
        except (OSError, ValueError, KeyError, TypeError):
            pass
        names = hermes_labels(out, prefix)
        if names is not None:
            labels = names["labels"]
            keys = sorted(int(k) for k in labels if str(k).isdigit() and k != "0")
            stems = unique_filenames([str(labels[str(k)]) for k in keys])
            listed += [f"{prefix}preview.png"] + [
                f"{prefix}{sub}/{stem}.nii.gz" for sub in TASK_FOLDERS for stem in stems]
        own = (own_output(out, prefix, name) for name in listed)
        return [p for p in own if p is not None]

    def _preview_or_nothing(self) -> bytes | None:
        """The preview PNG; a failure to draw it is a warning, never a failed save."""
        from hermes.inference.preview import preview_png

        try:
            return preview_png(self)
        except Exception as exc:  # noqa: BLE001 - the segmentation files matter, not the picture
            import warnings

            warnings.warn(f"preview.png not written: {type(exc).__name__}: {exc}", stacklevel=3)
            return None

    def _refuse_input_clash(self, paths: list[Path]) -> None:
        """:class:`FileExistsError` if one of ``paths`` is an input image file (any of the
        channel files of a multi-file input)."""
        inputs = {Path(src).resolve(): src for src in self.sources if Path(src).exists()}
        for p in paths:
            if p.resolve() in inputs:
                raise FileExistsError(f"output {p} would overwrite the input {inputs[p.resolve()]}"
                                      "; save to another folder or with another prefix")

    def _names_json(self) -> bytes:
        from hermes import __version__

        names = {
            "labels": {"0": "background", **{str(k): v for k, v in self.label_names.items()}},
            "modality": self.modality,
            "modality_detection": self.detection,
            "source": self.source,
            "inputs": input_record(self.sources),
            "model": self.model_source,
            "model_file": input_record([self.model_source]) if self.model_source else None,
            "settings": self.settings,
            "hermes_version": __version__,
        }
        return json.dumps(names, indent=1).encode()

    def _statistics_json(self) -> bytes:
        stats = {"voxel_volume_ml": self.voxel_volume_ml, "structures": self.statistics}
        return json.dumps(stats, indent=1).encode()

    def _statistics_csv(self) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["label", "task", "voxels", "volume_ml",
                                            "mean_intensity", "label_map_voxels"],
                           lineterminator="\n")
        w.writeheader()
        for s in self.statistics:
            w.writerow({**s, "mean_intensity": "" if s["mean_intensity"] is None
                        else s["mean_intensity"]})
        return buf.getvalue().encode()
