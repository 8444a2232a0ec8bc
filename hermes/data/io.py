"""Reading and writing medical volumes (NIfTI via nibabel, NRRD via pynrrd).

All readers return ``(array, affine)`` where ``affine`` is a 4x4 float64 matrix mapping voxel
indices ``(i, j, k, 1)`` of the array's first three axes to **RAS+ world coordinates in mm**
(nibabel's convention: +x towards the subject's Right, +y Anterior, +z Superior). Extra axes
(channels, e.g. a 4D NIfTI) follow the three spatial axes, as stored.
``nibabel.aff2axcodes(affine)`` gives the direction each array axis points to, e.g.
``('L', 'P', 'S')``. NRRD files in "left-posterior-superior" (LPS, the DICOM/ITK convention)
space are converted by negating world x and y.

The inference code reuses these functions, so they make no assumption about training.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "image_suffix",
    "strip_image_suffix",
    "load_image",
    "load_header",
    "nifti_data",
    "save_image",
    "spacing_from_affine",
    "axcodes",
    "nifti_affine_mm",
    "nifti_geometry",
]

#: File endings recognised as images, longest first so ``.nii.gz`` wins over ``.gz``.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr")

# LPS -> RAS: negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# NRRD "space" values that describe a 3D patient coordinate system, mapped to the world-axis
# flips that turn them into RAS.
_NRRD_SPACES: dict[str, np.ndarray] = {
    "right-anterior-superior": np.diag([1.0, 1.0, 1.0, 1.0]),
    "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0, 1.0]),
    "left-posterior-superior": _LPS_TO_RAS,
    "lps": _LPS_TO_RAS,
    # the scanner frame (DICOM's, LPS) and a generic right-handed frame: read as ITK reads
    # them (and 3D Slicer through it), as LPS
    "scanner-xyz": _LPS_TO_RAS,
    "3d-right-handed": _LPS_TO_RAS,
}
#: NRRD axis kinds of spatial axes (pynrrd 1.1 has no such list)
_NRRD_SPATIAL_KINDS = ("domain", "space")


#: Size in mm of the NIfTI spatial units (``xyzt_units & 7``: 1 metre, 2 mm, 3 micrometre); any
#: other code, "unknown" (0) included, is read as mm, as ITK does.
_NIFTI_UNIT_MM = {1: 1000.0, 2: 1.0, 3: 1e-3}


class ImageReadError(OSError):
    """A medical image file could not be read; the message names the file and the cause."""


def image_suffix(path: str | os.PathLike) -> str | None:
    """Return the recognised image suffix of ``path`` (e.g. ``'.nii.gz'``) or None."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_image_suffix(name: str) -> str:
    """``'case_001.nii.gz' -> 'case_001'``; names without an image suffix are returned as is."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of the three array axes: the norms of the affine's first 3 columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Anatomical direction each array axis points to, e.g. ``('L', 'P', 'S')`` (nibabel)."""
    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def _nifti_unit_mm(img: Any) -> float:
    """mm per spatial unit of a nibabel image's header (1 for formats without units)."""
    try:
        code = int(img.header["xyzt_units"])
    except (AttributeError, KeyError, ValueError):  # no NIfTI header (e.g. MGH, Analyze)
        return 1.0
    return _NIFTI_UNIT_MM.get(code & 0x07, 1.0)


def _scaled(affine: np.ndarray, mm_per_unit: float) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    a[:3, :] *= mm_per_unit  # world coordinates (steps and origin) from the file's unit to mm
    return a


def nifti_affine_mm(img: Any) -> np.ndarray:
    """Voxel -> RAS+ affine of a nibabel image in **mm**, whatever spatial unit (metre, mm,
    micrometre) its header declares; nibabel's ``img.affine`` is in the file's unit."""
    return _scaled(np.asarray(img.affine, np.float64), _nifti_unit_mm(img))


def nifti_geometry(img: Any) -> dict | None:
    """The header geometry of a nibabel NIfTI image, to give results the input's header:
    ``{"qform", "qform_code", "sform", "sform_code"}`` (affines in mm; None where the code is
    0), or None for images without NIfTI qform/sform or whose header disagrees with
    ``img.affine`` (nibabel's authority for in-memory images). Both codes 0 (no orientation
    stored) are kept too: outputs written without one are placed by every reader where it
    places the input (nibabel's fallback from the voxel sizes; ITK's identity direction)."""
    get_q, get_s = getattr(img, "get_qform", None), getattr(img, "get_sform", None)
    if get_q is None or get_s is None:
        return None
    qform, qcode = get_q(coded=True)
    sform, scode = get_s(coded=True)
    if not np.allclose(img.header.get_best_affine(), img.affine, atol=1e-5):
        return None  # an in-memory image whose affine was changed after its header was made
    mm = _nifti_unit_mm(img)
    return {"qform": None if qform is None else _scaled(qform, mm), "qform_code": int(qcode),
            "sform": None if sform is None else _scaled(sform, mm), "sform_code": int(scode)}


# --------------------------------------------------------------------------------------------
# NRRD
# --------------------------------------------------------------------------------------------


def _nrrd_affine(header: dict, path: Path) -> tuple[np.ndarray, list[int]]:
    """RAS affine of an NRRD header and the indices of its spatial axes.

    NRRD stores ``space directions`` as one row per axis (``None``/``nan`` for non-spatial axes
    such as a channel axis) and ``space origin``; world coordinates are in ``space``. A file
    naming no ``space`` or a scanner/right-handed one (or with ``spacings`` only) is read as ITK
    and 3D Slicer read it: in LPS coordinates (with ``spacings`` only: LPS axes, the first
    voxel at the ``axis mins``, plus half a spacing unless the axis is ``node``-centred; else
    at 0).
    """
    ndim = int(header.get("dimension", len(header.get("sizes", []))))
    directions = header.get("space directions")
    kinds = header.get("kinds")
    if directions is None:
        # No orientation stored: fall back to "spacings" (or unit voxels) along the axes.
        spacings = header.get("spacings")
        spatial = list(range(min(3, ndim)))
        if kinds is not None:
            spatial = [i for i, k in enumerate(kinds) if str(k).lower() in _NRRD_SPATIAL_KINDS]
            spatial = spatial[:3] if spatial else list(range(min(3, ndim)))
        sp = [1.0] * 3
        if spacings is not None:
            vals = [float(spacings[i]) for i in spatial]
            sp = [v if np.isfinite(v) and v > 0 else 1.0 for v in vals]
        if spacings is None or sp != vals:
            warnings.warn(f"{path}: the NRRD header gives no voxel size (space directions or "
                          "spacings) for every axis: taken as 1 mm; volumes and the model's "
                          "resampling depend on it", stacklevel=4)
        lps = np.diag([*sp, 1.0])
        mins, centers = header.get("axis mins"), header.get("centerings")
        if mins is not None:
            for j, i in enumerate(spatial):
                low = float(mins[i])
                node = centers is not None and str(centers[i]).lower() == "node"
                lps[j, 3] = (low if node else low + sp[j] / 2) if np.isfinite(low) else 0.0
        return _LPS_TO_RAS @ lps, spatial

    directions = np.asarray(
        [
            [np.nan] * 3 if d is None else list(np.asarray(d, dtype=np.float64).ravel())
            for d in directions
        ],
        dtype=np.float64,
    )
    spatial = [i for i in range(directions.shape[0]) if np.all(np.isfinite(directions[i]))]
    if len(spatial) != 3 or directions.shape[1] != 3:
        raise ImageReadError(
            f"{path}: expected 3 spatial axes in NRRD 'space directions', got "
            f"{len(spatial)} of dimension {directions.shape[1]}"
        )
    affine = np.eye(4)
    affine[:3, :3] = directions[spatial].T  # columns = world step per voxel along each axis
    origin = header.get("space origin")
    if origin is not None:
        origin = np.asarray(origin, dtype=np.float64).ravel()
        affine[:3, 3] = np.where(np.isfinite(origin), origin, 0.0)
    space = str(header.get("space", "")).strip().lower()
    if space and space not in _NRRD_SPACES:
        raise ImageReadError(f"{path}: unsupported NRRD space {header.get('space')!r}")
    return _NRRD_SPACES.get(space, _LPS_TO_RAS) @ affine, spatial


def _load_nrrd(path: Path, header_only: bool) -> tuple[np.ndarray | tuple[int, ...], np.ndarray]:
    import nrrd

    if header_only:
        header = nrrd.read_header(str(path))
        shape = tuple(int(s) for s in header["sizes"])
        affine, spatial = _nrrd_affine(header, path)
        other = [i for i in range(len(shape)) if i not in spatial]
        return tuple(shape[i] for i in spatial + other), affine
    # index_order="F": array axes follow the NRRD axis order (fastest first), like NIfTI.
    data, header = nrrd.read(str(path), index_order="F")
    affine, spatial = _nrrd_affine(header, path)
    other = [i for i in range(data.ndim) if i not in spatial]
    if spatial + other != list(range(data.ndim)):
        data = np.transpose(data, spatial + other)
    return data, affine


def _save_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    lps_affine = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    directions: list = [lps_affine[:3, i].tolist() for i in range(3)]
    kinds = ["domain"] * 3
    if array.ndim == 4:
        directions.append([np.nan, np.nan, np.nan])
        kinds.append("list")
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": lps_affine[:3, 3].tolist(),
        "kinds": kinds,
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.asarray(array), header, index_order="F")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _readable_suffix(path: Path) -> str:
    """The image suffix of an existing file; :class:`ImageReadError` naming the file otherwise."""
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    suffix = image_suffix(path)
    if suffix is None:
        raise ImageReadError(f"{path}: not a recognised image type (expected {IMAGE_SUFFIXES})")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    return suffix


def nifti_data(img: Any, dtype: np.dtype | None, name: str = "image") -> np.ndarray:
    """The voxels of a nibabel NIfTI image ``name``: scaled floats of ``dtype`` when it is
    floating, else the stored values (with any scaling nibabel applies).

    Raises:
        ImageReadError: complex (e.g. MR phase) or RGB voxels, which are no intensities.
    """
    stored = np.dtype(img.get_data_dtype())
    if stored.kind == "c":
        raise ImageReadError(f"{name}: complex-valued voxels ({stored}): save real intensities "
                             "(for complex MR data e.g. the magnitude)")
    if stored.fields is not None or stored.kind == "V":
        raise ImageReadError(f"{name}: RGB/structured voxels ({stored}) are no scalar image; "
                             "save one intensity channel")
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
        return np.asarray(img.get_fdata(dtype=np.dtype(dtype)))
    return np.asarray(img.dataobj)


def _nifti_from_stream(f: Any) -> Any:
    """A NIfTI-1 or NIfTI-2 image (by the header's ``sizeof_hdr``, 348 or 540) read from an
    open binary stream; its voxels are read from ``f`` while it stays open."""
    first = f.read(4)
    f.seek(0)
    nifti2 = first in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_stream(f)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _load_nifti_gz(path: Path, dtype: np.dtype | None) -> tuple[Any, np.ndarray]:
    """``(image, voxels)`` of a ``.nii.gz`` file read through one gzip stream to its end, so
    that the stream's CRC and length are checked (nibabel stops reading where the voxels end:
    damaged compressed data would otherwise be read as other voxel values). A file so named
    that is not compressed is read as ``.nii`` (as ITK does)."""
    compressed = _is_gzip(path)
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        img = _nifti_from_stream(f)
        data = nifti_data(img, dtype, str(path))
        if compressed:
            f.read()  # the rest of the stream, up to the CRC/length check at its end
    return img, data


def load_image(
    path: str | os.PathLike, dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``, ``.nhdr``) volume.

    Args:
        path: the file.
        dtype: optional dtype to cast the data to (NIfTI scaling slope/intercept is applied
            when the dtype is floating; integer label files keep their stored integers).

    Returns:
        ``(array, affine)``: ``array`` has shape ``(X, Y, Z)`` or ``(X, Y, Z, C)`` in the file's
        voxel order; ``affine`` is 4x4 float64, voxel index -> RAS+ mm (NIfTI files declaring
        metres or micrometres are converted).

    Raises:
        ImageReadError: the file is missing, of an unknown type, or corrupt; names the file.
    """
    path = Path(path)
    suffix = _readable_suffix(path)
    try:
        if suffix in (".nrrd", ".nhdr"):
            data, affine = _load_nrrd(path, header_only=False)
        else:
            if suffix == ".nii.gz":
                img, data = _load_nifti_gz(path, dtype)
            else:
                img = nib.load(str(path))
                data = nifti_data(img, dtype, str(path))
            affine = nifti_affine_mm(img)
            if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C) NIfTI vector layout
                data = data[:, :, :, 0, :]
    except ImageReadError:
        raise
    except Exception as exc:  # nibabel/pynrrd/zlib raise many different types
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    data = np.asarray(data)
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(f"{path}: invalid (singular or non-finite) voxel-to-world affine")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, affine


def load_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Cheap geometry read: ``(shape, affine)`` without loading voxel data.

    ``shape`` lists the three spatial axes first, then any channel axis, as :func:`load_image`.
    """
    path = Path(path)
    suffix = _readable_suffix(path)
    try:
        if suffix in (".nrrd", ".nhdr"):
            shape, affine = _load_nrrd(path, header_only=True)
        else:
            if suffix == ".nii.gz" and not _is_gzip(path):  # named .nii.gz, not compressed
                with open(path, "rb") as f:
                    img = _nifti_from_stream(f)
            else:
                img = nib.load(str(path))
            shape, affine = tuple(int(s) for s in img.shape), nifti_affine_mm(img)
            if len(shape) == 5 and shape[3] == 1:
                shape = shape[:3] + shape[4:]
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read header ({type(exc).__name__}: {exc})") from exc
    shape = tuple(shape) + (1,) * (3 - len(shape))
    return shape, affine  # type: ignore[return-value]


def save_image(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` (X, Y, Z[, C]) with a RAS ``affine`` as NIfTI or NRRD (by suffix).

    NRRD files are written in LPS space (the usual convention of ITK/3D Slicer), so reading them
    back with :func:`load_image` returns the same RAS affine.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: cannot tell the image format from the file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".nrrd", ".nhdr"):
        _save_nrrd(path, array, affine)
    else:
        img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, str(path))
    return path
