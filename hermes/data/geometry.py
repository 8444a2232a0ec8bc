"""Voxel-grid geometry: canonical reorientation, cropping and resampling with exact affines.

Arrays here are channel-first, ``(C, X, Y, Z)`` for images and ``(X, Y, Z)`` for labels, and
``affine`` always maps voxel indices of the three spatial axes to RAS+ world mm. Every function
returns the new affine, so a cached array can be mapped back to the original image exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage

from hermes.data.io import spacing_from_affine

__all__ = [
    "CANONICAL_AXCODES",
    "reorient",
    "orientation_transform",
    "nonzero_bbox",
    "crop",
    "resampled_grid",
    "resample",
]

#: Canonical orientation of cached arrays: axis 0 -> Right, 1 -> Anterior, 2 -> Superior
#: (nibabel's "closest canonical", also MONAI ``Orientation("RAS")``).
CANONICAL_AXCODES: tuple[str, str, str] = ("R", "A", "S")


def orientation_transform(
    affine: np.ndarray, axcodes: Sequence[str] = CANONICAL_AXCODES
) -> np.ndarray:
    """nibabel orientation transform (3x2: target axis, flip) from ``affine`` to ``axcodes``."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))


def reorient(
    array: np.ndarray, affine: np.ndarray, axcodes: Sequence[str] = CANONICAL_AXCODES,
    channel_first: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the spatial axes so they point along ``axcodes`` (no interpolation).

    Args:
        array: ``(X, Y, Z[, ...])`` or, with ``channel_first``, ``(C, X, Y, Z)``.
        affine: 4x4 voxel -> RAS mm of ``array``'s spatial axes.

    Returns:
        ``(array, affine)`` reoriented; a view where possible (call ``np.ascontiguousarray``).
        Oblique affines are handled: each voxel axis goes to its closest world axis.
    """
    spatial = array.shape[1:4] if channel_first else array.shape[:3]
    t = orientation_transform(affine, axcodes)
    new_affine = np.asarray(affine, np.float64) @ inv_ornt_aff(t, spatial)
    if channel_first:
        moved = np.moveaxis(array, 0, -1)
        out = np.moveaxis(apply_orientation(moved, t), -1, 0)
    else:
        out = apply_orientation(array, t)
    return out, new_affine


def nonzero_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of a boolean (X, Y, Z) mask;
    the whole array when the mask is empty."""
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


def crop(
    array: np.ndarray, affine: np.ndarray, bbox: Sequence[tuple[int, int]],
    channel_first: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop the spatial axes to the half-open ``bbox``; the affine's origin moves to the corner."""
    sl = tuple(slice(a, b) for a, b in bbox)
    out = array[(slice(None), *sl)] if channel_first else array[sl]
    new_affine = np.asarray(affine, np.float64).copy()
    new_affine[:3, 3] = affine[:3, :3] @ np.array([a for a, _ in bbox], float) + affine[:3, 3]
    return out, new_affine


#: Most voxels a resampled volume may have (16 GiB of float32 per channel): larger ones come
#: from a wrong voxel size or unit, not from an image.
MAX_RESAMPLED_VOXELS = 1 << 32


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: float | Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """Geometry of resampling a grid to ``spacing`` mm, keeping axis directions and centre.

    New voxel ``i`` (per axis) sits at old fractional index ``offset + i * step`` with
    ``step = new_spacing / old_spacing``, centred so both grids share their midpoint.

    Returns:
        ``(new_shape, new_affine, step (3,), offset (3,))``.
    """
    old_sp = np.asarray(spacing_from_affine(affine))
    new_sp = np.broadcast_to(np.asarray(spacing, np.float64), (3,)).astype(np.float64)
    if np.any(new_sp <= 0):
        raise ValueError(f"target spacing must be positive, got {spacing}")
    shape_a = np.asarray(shape[:3], np.float64)
    new_size = np.maximum(1, np.round(shape_a * old_sp / new_sp))
    if float(np.prod(new_size)) > MAX_RESAMPLED_VOXELS:
        def dims(values: np.ndarray, fmt: str = ".4g") -> str:
            return " x ".join(f"{v:{fmt}}" for v in values)

        raise ValueError(
            f"resampling {dims(shape_a, '.0f')} voxels of {dims(old_sp)} mm to {dims(new_sp)} mm "
            f"would give {dims(new_size, '.0f')} voxels: is the image's voxel size right (its "
            "header's spacing and unit)?")
    new_shape = new_size.astype(int)
    step = new_sp / old_sp
    offset = ((shape_a - 1) - (new_shape - 1) * step) / 2.0
    new_affine = np.asarray(affine, np.float64).copy()
    new_affine[:3, :3] = affine[:3, :3] * step[None, :]
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return tuple(int(s) for s in new_shape), new_affine, step, offset  # type: ignore[return-value]


def _resample_3d(
    vol: np.ndarray, new_shape: Sequence[int], step: np.ndarray, offset: np.ndarray, order: int,
    axes: Sequence[int] = (0, 1, 2), out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample only ``axes`` of a 3D volume (the others must already have their new size),
    into ``out`` (float32, or the volume's integer dtype for order 0: :func:`resample` picks
    it) or, when None, a new float32 array (the anisotropic path's in-plane pass)."""
    m = np.ones(3)
    o = np.zeros(3)
    for a in axes:
        m[a], o[a] = step[a], offset[a]
    out_shape = [vol.shape[a] if a not in axes else new_shape[a] for a in range(3)]
    if order in (1, 3):
        return separable_resample(vol, m, o, out_shape, order, out=out)
    if out is None:
        out = np.empty(out_shape, np.float32)
    if out.dtype == np.float32:
        vol = vol.astype(np.float32, copy=False)
    ndimage.affine_transform(vol, m, offset=o, output_shape=tuple(out_shape), output=out,
                             order=order, mode="nearest", prefilter=order > 1)
    return out


def resample(
    array: np.ndarray, affine: np.ndarray, spacing: float | Sequence[float], order: int = 3,
    anisotropy_threshold: float = 3.0, channel_first: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``(C, X, Y, Z)`` (or ``(X, Y, Z)`` with ``channel_first=False``) to ``spacing``.

    Args:
        order: spline order: 0 nearest (labels), 1 linear, 3 cubic (images).
        anisotropy_threshold: when the coarsest/finest spacing ratio exceeds it and
            ``order > 1``, the coarse axis is interpolated linearly after the in-plane axes
            with ``order`` (avoids spline ringing across thick slices, as nnU-Net does).

    Returns:
        ``(resampled float32 array (integer dtype kept for order 0), new_affine)``.
    """
    vol = array if channel_first else array[None]
    new_shape, new_affine, step, offset = resampled_grid(vol.shape[1:], affine, spacing)
    if tuple(new_shape) == tuple(vol.shape[1:]) and np.allclose(step, 1) and np.allclose(offset, 0):
        out = vol.astype(np.float32) if order > 0 else vol.copy()
        return (out if channel_first else out[0]), new_affine
    sp = np.asarray(spacing_from_affine(affine))
    anisotropic = order > 1 and sp.max() / sp.min() > anisotropy_threshold
    kind = vol.dtype if order == 0 and vol.dtype.kind in "uib" else np.float32
    out = np.empty((vol.shape[0], *new_shape), kind)
    for c in range(vol.shape[0]):
        if anisotropic:
            coarse = int(np.argmax(sp))
            fine_axes = [a for a in range(3) if a != coarse]
            tmp = _resample_3d(vol[c], new_shape, step, offset, order, fine_axes)
            _resample_3d(tmp, new_shape, step, offset, 1, [coarse], out=out[c])
        else:
            _resample_3d(vol[c], new_shape, step, offset, order, out=out[c])
    return (out if channel_first else out[0]), new_affine


#: Edge padding before the cubic prefilter (scipy pads by the same amount for mode "nearest").
_SPLINE_PAD = 12


def _bspline3_weights(t: np.ndarray) -> np.ndarray:
    """4 x n cubic B-spline weights of the taps at -1, 0, 1, 2 for fractional offsets ``t``."""
    return np.stack([(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
                     (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6])


def separable_resample(
    array: np.ndarray, scale: Sequence[float], offset: Sequence[float],
    out_shape: Sequence[int], order: int, out: np.ndarray | None = None,
    window: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Spline interpolation (order 1 or 3) of a 3-D array under an axis-aligned map.

    Output voxel ``i`` samples ``array`` at ``scale * i + offset`` per axis (voxel units), the
    array extended by its edge values: the result of
    ``scipy.ndimage.affine_transform(array, scale, offset, order=order, mode="nearest")``
    (cubic: with its spline prefilter) to float32 rounding (for sample points less than 10
    voxels outside the array; farther ones take the edge), computed one axis at a time (the
    axes that shrink the volume first; axes with the identity map are skipped), which costs 2 or
    4 taps per axis instead of 8 or 64 per voxel. Each axis is computed in slabs along another
    axis (``SLAB_BYTES`` of output each), so the temporaries (edge padding, spline
    coefficients, taps) are slab-sized: memory is the input, the axis' result and a few slabs.
    NumPy/SciPy only, so it is safe in forked worker processes.

    Args:
        out: optional array of the output's shape (any strides, e.g. a flipped view of a larger
            array) to write into; the last axis processed is written into it directly.
        window: linear interpolation only: per axis ``(start, stop)`` of the ``out_shape``
            output to compute (the output is that box), bit-identical to the same voxels of the
            whole output; only the input voxels the box samples are read.

    Returns:
        ``out_shape`` (or ``window``'s box) float32 (``out`` when given).
    """
    if order not in (1, 3):
        raise ValueError(f"order must be 1 or 3, got {order}")
    full = tuple(int(v) for v in out_shape)
    vol = np.asarray(array, dtype=np.float32)
    if vol.ndim != 3 or len(full) != 3:
        raise ValueError(f"need a 3-D array and 3 output sizes, got {vol.shape} -> {full}")
    box = [(0, m) for m in full] if window is None else [(int(a), int(b)) for a, b in window]
    if window is not None and (order != 1 or len(box) != 3 or any(
            not 0 <= a < b <= m for (a, b), m in zip(box, full, strict=False))):
        raise ValueError(f"window needs order 1 and 3 ranges inside {full}, got {window}")
    out_shape = tuple(b - a for a, b in box)
    if out is not None and tuple(out.shape) != out_shape:
        raise ValueError(f"out has shape {out.shape}, expected {out_shape}")
    # the axis order of the whole output (a window's values are the same to the bit)
    axes = [a for a in sorted(range(3), key=lambda a: full[a] / max(vol.shape[a], 1))
            if not (vol.shape[a] == full[a] and float(scale[a]) == 1.0
                    and float(offset[a]) == 0.0)]
    taps_of = {}
    read = [slice(a, b) for a, b in box]  # input voxels read per axis (identity axes: the box)
    for axis in axes:
        taps = _axis_taps(vol.shape[axis], full[axis], float(scale[axis]), float(offset[axis]),
                          order)
        if window is not None:
            lo, hi, frac = (t[box[axis][0]:box[axis][1]] for t in taps)
            first = int(lo.min())
            read[axis] = slice(first, int(hi.max()) + 1)
            taps = (lo - first, hi - first, frac)
        else:
            read[axis] = slice(None)
        taps_of[axis] = taps
    if window is not None:
        vol = vol[tuple(read)]
    for i, axis in enumerate(axes):
        shape = list(vol.shape)
        shape[axis] = out_shape[axis]
        last = i == len(axes) - 1
        dest = out if last and out is not None else np.empty(shape, np.float32)
        taps = taps_of[axis]
        along = 0 if axis != 0 else 1
        plane = dest.size // max(dest.shape[along], 1) * 4
        step = max(1, SLAB_BYTES // max(plane, 1))
        for start in range(0, dest.shape[along], step):
            sl = [slice(None)] * 3
            sl[along] = slice(start, start + step)
            dest[tuple(sl)] = _interpolate_axis(vol[tuple(sl)], taps, axis, order)
        vol = dest
    if out is not None:
        if not axes:
            out[...] = vol
        return out
    return np.ascontiguousarray(vol, dtype=np.float32)


#: Bytes of output per slab of :func:`separable_resample` (its temporaries are a few slabs).
SLAB_BYTES = 1 << 22


def _axis_taps(n: int, m: int, scale: float, offset: float,
               order: int) -> tuple[np.ndarray, ...]:
    """Sample indices and weights of one axis (``n`` -> ``m`` voxels) for
    :func:`_interpolate_axis`: linear ``(lo, hi, frac)``, cubic ``(base, weights 4 x m)``."""
    coord = scale * np.arange(m) + offset
    if order == 1:
        coord = np.clip(coord, 0, n - 1)
        lo = np.minimum(np.floor(coord).astype(np.int64), max(n - 2, 0))
        hi = np.minimum(lo + 1, n - 1)
        return lo, hi, (coord - lo).astype(np.float32)
    coord = coord + _SPLINE_PAD
    base = np.floor(coord).astype(np.int64)
    return base, _bspline3_weights(coord - base).astype(np.float32)


def _interpolate_axis(vol: np.ndarray, taps: tuple[np.ndarray, ...], axis: int,
                      order: int) -> np.ndarray:
    """``vol`` interpolated along ``axis`` with :func:`_axis_taps` (a new float32 array)."""
    shape = [1, 1, 1]
    shape[axis] = taps[0].size
    if order == 1:
        lo, hi, frac = taps
        return _lerp(vol, lo, hi, frac.reshape(shape), axis)
    base, weights = taps
    n = vol.shape[axis]
    pad = [(0, 0)] * 3
    pad[axis] = (_SPLINE_PAD, _SPLINE_PAD)
    coef = ndimage.spline_filter1d(np.pad(vol, pad, mode="edge"), order=3, axis=axis,
                                   mode="mirror", output=np.float32)
    acc = None
    for k in range(4):
        idx = np.clip(base - 1 + k, 0, n + 2 * _SPLINE_PAD - 1)
        term = np.take(coef, idx, axis=axis)
        term *= weights[k].reshape(shape)
        acc = term if acc is None else np.add(acc, term, out=acc)
    return acc


def _lerp(vol: np.ndarray, lo: np.ndarray, hi: np.ndarray, frac: np.ndarray,
          axis: int) -> np.ndarray:
    """``vol[lo] + (vol[hi] - vol[lo]) * frac`` along ``axis``, in place on the two taken
    arrays (two output-sized arrays at a time, not four)."""
    a = np.take(vol, lo, axis=axis)
    b = np.take(vol, hi, axis=axis)
    b -= a
    b *= frac
    a += b
    return a
