"""Mapping arrays between voxel grids that share a world space (affines voxel -> RAS mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def resample_to_grid(
    array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
    dst_shape: Sequence[int], order: int = 0, cval: float = 0.0,
) -> np.ndarray:
    """Sample ``array`` (``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)``) on another grid.

    Each destination voxel ``j`` takes the value at world point ``dst_affine @ j`` of the source
    (nearest neighbour for ``order=0``, linear for 1); points outside the source get ``cval``.
    Exact for permutations, flips, crops and pure scalings between the grids.

    Returns:
        ``(*dst_shape)`` or ``(C, *dst_shape)``, dtype of ``array`` for order 0 else float32.
    """
    src_affine = np.asarray(src_affine, np.float64)
    dst_affine = np.asarray(dst_affine, np.float64)
    m = np.linalg.inv(src_affine) @ dst_affine  # dst voxel -> src voxel
    # snap near-integer entries so that permutation/flip/crop mappings stay exact
    m = np.where(np.abs(m - np.round(m)) < 1e-6, np.round(m), m)
    shape = tuple(int(s) for s in dst_shape)
    chans = array if array.ndim == 4 else array[None]
    out_dtype = chans.dtype if order == 0 else np.float32
    out = np.empty((chans.shape[0], *shape), out_dtype)
    for c in range(chans.shape[0]):
        src = chans[c] if order == 0 else chans[c].astype(np.float32)
        if order == 0 and src.dtype == bool:
            src = src.view(np.uint8)
            ndimage.affine_transform(src, m[:3, :3], m[:3, 3], output_shape=shape,
                                     output=out[c].view(np.uint8), order=0, mode="constant",
                                     cval=cval)
            continue
        ndimage.affine_transform(src, m[:3, :3], m[:3, 3], output_shape=shape, output=out[c],
                                 order=order, mode="constant", cval=cval)
    return out if array.ndim == 4 else out[0]


def linear_resample_axes(
    array: np.ndarray, scale: Sequence[float], offset: Sequence[float],
    out_shape: Sequence[int],
) -> np.ndarray:
    """Linear interpolation of a 3-D array under an axis-aligned map, edges extended.

    Output voxel ``i`` samples ``array`` at ``scale * i + offset`` (per axis, voxel units),
    coordinates outside the array are clamped to its edge: the same result as
    ``scipy.ndimage.affine_transform(array, scale, offset, order=1, mode="nearest")`` up to
    float32 rounding, computed as three 1-D interpolations (separable) with torch's threads,
    the axes that shrink the volume first. (Not for the preprocessing workers: they are forked
    processes, in which torch's OpenMP pool may hang after the parent used it.)

    Args:
        array: ``(X, Y, Z)`` values (any real dtype; computed in float32).
        scale, offset: 3 values each.
        out_shape: 3 sizes.
    Returns:
        ``out_shape`` float32.
    """
    if array.ndim != 3:
        raise ValueError(f"array must be 3-D, got shape {array.shape}")
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    out_shape = tuple(int(s) for s in out_shape)
    order = sorted(range(3), key=lambda a: out_shape[a] / max(array.shape[a], 1))
    for axis in order:
        n, m = t.shape[axis], out_shape[axis]
        if n == m and float(scale[axis]) == 1.0 and float(offset[axis]) == 0.0:
            continue  # identity along this axis
        coord = np.clip(float(scale[axis]) * np.arange(m) + float(offset[axis]), 0, n - 1)
        lo = np.minimum(np.floor(coord).astype(np.int64), max(n - 2, 0))
        view = [1, 1, 1]
        view[axis] = m
        if n == 1:
            t = t.index_select(axis, torch.zeros(m, dtype=torch.int64))
            continue
        frac = torch.from_numpy((coord - lo).astype(np.float32)).view(view)
        idx = torch.from_numpy(lo)
        a = t.index_select(axis, idx)
        t = torch.lerp(a, t.index_select(axis, idx + 1), frac)
    return np.ascontiguousarray(t.numpy())
