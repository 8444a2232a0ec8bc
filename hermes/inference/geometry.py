"""Mapping arrays between voxel grids that share a world space (affines voxel -> RAS mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def pad_to_window(image: np.ndarray, roi: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad a ``(C, X, Y, Z)`` image to at least ``roi`` voxels per axis, centred, with each
    channel's minimum: what the model saw outside the volume in training (the cache's crops pad
    so), where the sliding window would pad with 0 (the z-scored mean: mid-grey).

    Returns:
        ``(padded image, slices of the original voxels in the padded grid)``; the image itself
        and full slices when no axis is shorter than ``roi``.
    """
    shape = image.shape[1:]
    pads = [max(int(r) - s, 0) for s, r in zip(shape, roi, strict=True)]
    inside = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape, strict=True))
    if not any(pads):
        return image, inside
    out = np.empty((image.shape[0], *(s + p for s, p in zip(shape, pads, strict=True))),
                   image.dtype)
    out[:] = image.reshape(image.shape[0], -1).min(axis=1)[:, None, None, None]
    out[(slice(None), *inside)] = image
    return out, inside
