"""Reading a DICOM series folder as a volume with a RAS affine (needs ``pydicom``).

DICOM places every slice in the patient coordinate system LPS (+x Left, +y Posterior,
+z Superior) with ``ImagePositionPatient`` (the centre of the first transmitted pixel, mm),
``ImageOrientationPatient`` (direction cosines of a row and of a column) and ``PixelSpacing``
(spacing between rows, then between columns, mm). :func:`load_dicom_series` sorts the slices
along the normal of the slice plane, stacks them as ``(column, row, slice)`` (so the array's
first axis runs along a row, as in NIfTI), applies ``RescaleSlope``/``RescaleIntercept`` and
returns the voxel -> RAS+ mm affine (LPS negated in x and y), the convention of
:mod:`hermes.data.io`.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hermes._text import first_of
from hermes.data.io import ImageReadError

__all__ = ["DicomError", "is_dicom_file", "load_dicom_series", "series_uid_of"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: File name suffixes of DICOM files: such a file that does not read as DICOM is damaged.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Elements of which a DICOM object has at least one (what pydicom makes of other files with
#: force=True has none).
_DICOM_MARKS = ("SOPClassUID", "PixelData", "ImagePositionPatient")


class DicomError(ImageReadError):
    """A DICOM series cannot be read as one 3-D volume; the message names the folder."""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` starts like a DICOM Part-10 file (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DicomError("reading DICOM needs pydicom: pip install pydicom") from exc
    return pydicom


def series_uid_of(path: str | os.PathLike) -> str:
    """``SeriesInstanceUID`` of one DICOM file ("" when it has none): the series to read from
    its folder when one slice file is given."""
    try:
        ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
    except DicomError:
        raise
    except Exception as exc:
        raise DicomError(f"{path}: cannot read DICOM header ({type(exc).__name__}: "
                         f"{exc})") from exc
    return str(getattr(ds, "SeriesInstanceUID", ""))


def _read_files(folder: Path, pixels: bool) -> Iterator[tuple[Path, Any]]:
    """``(path, dataset or None)`` of every file directly in ``folder``, in name order: what
    pydicom reads (with ``force``, so files without the DICM preamble are read too; hidden files
    only with it), None where it fails. pydicom's warnings about other files are kept quiet."""
    pydicom = _pydicom()
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(p), stop_before_pixels=not pixels,
                                     force=not p.name.startswith("."))
        except Exception:  # not a DICOM file
            ds = None
        yield p, ds


def series_modality(folder: str | os.PathLike, series_uid: str | None = None) -> str | None:
    """The ``Modality`` tag (``"CT"``, ``"MR"``, ``"PT"`` ...) of the series that
    :func:`load_dicom_series` reads from ``folder``; None when its slices do not say."""
    for _, ds in _read_files(Path(folder), pixels=False):
        if ds is None or not hasattr(ds, "ImagePositionPatient"):
            continue
        if series_uid is None or str(getattr(ds, "SeriesInstanceUID", "")) == series_uid:
            tag = str(getattr(ds, "Modality", "") or "").strip().upper()
            return tag or None
    return None


def load_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series from ``folder`` (files directly inside it).

    Args:
        folder: a folder holding the slices of one series (other files are ignored).
        series_uid: which ``SeriesInstanceUID`` to read when the folder holds several.

    Returns:
        ``(array (X, Y, Z) float32, affine 4x4 float64)``: X along a row (columns), Y along a
        column (rows), Z across slices in increasing position along the slice normal;
        ``affine`` maps voxel indices to RAS+ mm. Values have the rescale slope/intercept
        applied (e.g. Hounsfield units for CT).

    Raises:
        DicomError: no readable slice, several series without ``series_uid``, mixed
            orientations or sizes, a single slice (2-D), or non-uniform slice spacing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder (expected a DICOM series folder)")
    series: dict[str, list] = defaultdict(list)
    damaged: list[str] = []
    multiframe: list[str] = []
    lacking: dict[str, int] = defaultdict(int)  # tag -> image files without it
    for p, ds in _read_files(folder, pixels=True):
        if ds is None or not any(k in ds for k in _DICOM_MARKS):
            if p.suffix.lower() in DICOM_SUFFIXES:  # named as DICOM, yet unreadable as such
                damaged.append(p.name)
            continue
        if "PixelData" not in ds:
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            multiframe.append(p.name)
            continue
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient",
                               "PixelSpacing") if not hasattr(ds, k)]
        for k in missing:
            lacking[k] += 1
        if not missing:
            series[str(getattr(ds, "SeriesInstanceUID", ""))].append(ds)
    if damaged:
        raise DicomError(f"{folder}: {len(damaged)} file(s) named as DICOM are not readable "
                         f"DICOM ({first_of(damaged, 3)}): damaged or incomplete copies? Replace "
                         "or remove them")
    if not series and multiframe:
        raise DicomError(f"{folder}: multi-frame DICOM ({first_of(multiframe, 3)}: several "
                         "frames in one file, e.g. enhanced CT/MR) is not supported; convert it "
                         "to NIfTI (e.g. with dcm2niix) or export one file per slice")
    if not series:
        why = (f" ({', '.join(f'{n} image file(s) without {k}' for k, n in lacking.items())})"
               if lacking else "")
        raise DicomError(f"{folder}: no DICOM image slice with position, orientation and "
                         f"pixel spacing found{why}")
    if series_uid is not None:
        if series_uid not in series:
            raise DicomError(f"{folder}: no series {series_uid!r}; found {sorted(series)}")
        slices = series[series_uid]
    elif len(series) > 1:
        desc = ", ".join(f"{uid} ({len(s)} slices)" for uid, s in series.items())
        raise DicomError(f"{folder}: holds {len(series)} series ({desc}); choose one with "
                         "series_uid= or, for hermes.segment and `hermes segment -i`, give the "
                         "path of one of its files instead of the folder")
    else:
        slices = next(iter(series.values()))
    if len(slices) < 2:
        raise DicomError(f"{folder}: the series has a single slice; a 3-D volume is needed")

    iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient], np.float64)
    for ds in slices[1:]:
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        if not np.allclose(other, iop, atol=1e-4):
            raise DicomError(f"{folder}: slices have different ImageOrientationPatient")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    dist = positions @ normal
    gaps = np.diff(dist)
    if np.any(np.abs(gaps) < 1e-6):
        raise DicomError(f"{folder}: two slices share one position (duplicate or multi-frame "
                         "series; split it first)")
    mean_gap = float(gaps.mean())
    if np.max(np.abs(gaps - mean_gap)) > max(0.01 * abs(mean_gap), 1e-3):
        raise DicomError(
            f"{folder}: non-uniform slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm; "
            "missing slices?); resample the series first"
        )
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # between rows, between columns
    for ds in slices[1:]:
        if not np.allclose([float(v) for v in ds.PixelSpacing], (dr, dc), rtol=1e-4):
            raise DicomError(f"{folder}: slices have different PixelSpacing ({dr:g} x {dc:g} "
                             f"and {' x '.join(f'{float(v):g}' for v in ds.PixelSpacing)} mm)")
    vol = np.empty((cols, rows, len(slices)), np.float32)
    for k, ds in enumerate(slices):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomError(f"{folder}: slices have different sizes")
        try:
            pix = ds.pixel_array
        except Exception as exc:
            raise DicomError(f"{folder}: cannot decode pixel data ({type(exc).__name__}: "
                             f"{exc})") from exc
        if pix.ndim != 2:
            raise DicomError(f"{folder}: expected single-frame greyscale slices, got pixel "
                             f"array of shape {pix.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        vol[:, :, k] = pix.T.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    return vol, _LPS_TO_RAS @ lps
