"""Mapping arrays between voxel grids that share a world space (affines voxel -> RAS mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from hermes.data.geometry import CANONICAL_AXCODES, crop, separable_resample

#: float32 rounding of a linear interpolation: a value reaches a threshold only if one of the
#: samples it interpolates reaches ``threshold - THRESHOLD_MARGIN``
THRESHOLD_MARGIN = 1e-6


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


class BackMapper:
    """Maps ``(X', Y', Z')`` arrays on the model grid to the original ``(X, Y, Z)`` grid;
    ``geom`` is the geometry of :func:`hermes.data.preprocess.prepare_arrays` (a cached case's
    metadata holds it).

    Model grid -> canonical cropped grid: a per-axis scaling + shift (linear interpolation,
    edge values extended by at most half a model voxel); the cropped region is embedded in the
    canonical grid (background elsewhere) and permuted/flipped back to the original axes
    (exact, no interpolation).
    """

    def __init__(self, geom: dict):
        self.orig_shape = tuple(int(s) for s in geom["original"]["shape"])
        self.orig_affine = np.asarray(geom["original"]["affine"], np.float64)
        canon_aff = np.asarray(geom["canonical"]["affine"], np.float64)
        self.canon_shape = tuple(int(s) for s in geom["canonical"]["shape"])
        self.bbox = [tuple(int(v) for v in b) for b in geom["crop_bbox"]]
        _, crop_aff = crop(np.zeros((1, 1, 1)), canon_aff, self.bbox)
        self.crop_shape = tuple(b - a for a, b in self.bbox)
        model_aff = np.asarray(geom["affine"], np.float64)
        m = np.linalg.inv(model_aff) @ crop_aff  # crop voxel -> model voxel
        m = np.where(np.abs(m - np.round(m)) < 1e-6, np.round(m), m)
        self.matrix, self.offset = np.diag(m[:3, :3]).copy(), m[:3, 3].copy()
        if not np.allclose(m[:3, :3], np.diag(self.matrix), atol=1e-6):
            raise AssertionError("model grid is not axis-aligned with the canonical grid")
        self.identity = np.allclose(self.matrix, 1) and np.allclose(self.offset, 0)
        self.inverse_ornt = ornt_transform(io_orientation(self.orig_affine),
                                           axcodes2ornt(CANONICAL_AXCODES))
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None  # threshold_box's buffers

    def __call__(self, arr: np.ndarray, order: int = 1, out: np.ndarray | None = None
                 ) -> np.ndarray:
        """``arr`` (X', Y', Z') float or bool on the model grid -> original grid (float32 for
        ``order=1``, the input dtype for ``order=0``), written into ``out`` (of the original
        shape) when given, without a canonical-grid copy."""
        if out is None:
            out = np.empty(self.orig_shape, np.float32 if order else arr.dtype)
        # the original-grid array seen in canonical axes (flips and a transpose: a view)
        canon = apply_orientation(out, self.inverse_ornt)
        assert canon.shape == self.canon_shape
        inside = tuple(slice(a, b) for a, b in self.bbox)
        canon[...] = 0
        if self.identity and tuple(arr.shape) == self.crop_shape:
            cropped = arr
        elif order == 1:
            separable_resample(arr, self.matrix, self.offset, self.crop_shape, 1,
                               out=canon[inside])
            return out
        else:
            src = arr
            cropped = np.empty(self.crop_shape, src.dtype)
            if src.dtype == bool:
                src, cropped = src.view(np.uint8), cropped.view(np.uint8)
            ndimage.affine_transform(src, self.matrix, self.offset, output_shape=self.crop_shape,
                                     output=cropped, order=order, mode="nearest",
                                     prefilter=False)
            if arr.dtype == bool:
                cropped = cropped.view(bool)
        canon[inside] = cropped
        return out

    def threshold_box(self, arr: np.ndarray, threshold: float
                      ) -> tuple[tuple[slice, ...], np.ndarray] | tuple[None, None]:
        """``(box, mask)``: where ``self(arr) >= threshold`` on the original grid, computed
        inside the box that can hold such voxels only (bit-identical to thresholding the
        whole mapped array; (None, None) when no voxel reaches it). ``mask`` is a view of a
        buffer the next call reuses: copy what is kept.

        A linearly interpolated value reaches the threshold only if one of the samples it
        interpolates does (up to float32 rounding, covered by ``THRESHOLD_MARGIN``), so only
        output voxels sampling within one model voxel of ``arr``'s box of such samples are
        computed.
        """
        from hermes.inference.masks import bounding_box

        hits = bounding_box(arr >= threshold - THRESHOLD_MARGIN)
        if hits is None:
            return None, None
        same = self.identity and tuple(arr.shape) == self.crop_shape
        window = []
        for a in range(3):
            n, start, stop = self.crop_shape[a], hits[a].start, hits[a].stop
            m, o = float(self.matrix[a]), float(self.offset[a])
            if same:
                window.append((start, stop))
                continue
            if m <= 0:  # not produced by preprocessing; the whole axis
                window.append((0, n))
                continue
            # samples x = m i + o with a neighbour in [start, stop - 1] (edges extend outwards)
            first = 0 if start == 0 else max(0, int(np.ceil((start - 1 - o) / m)) - 1)
            last = n if stop == arr.shape[a] else min(n, int(np.floor((stop - o) / m)) + 2)
            if first >= last:
                return None, None
            window.append((first, last))
        region = tuple(slice(a, b) for a, b in window)
        if self._scratch is None:  # reused by every call: no fresh pages per task
            self._scratch = (np.empty(self.crop_shape, np.float32),
                             np.empty(self.crop_shape, bool))
        if same:
            values = arr[region]
        else:
            values = separable_resample(arr, self.matrix, self.offset, self.crop_shape, 1,
                                        window=window, out=self._scratch[0][region])
        mask = np.greater_equal(values, threshold, out=self._scratch[1][region])
        # canonical crop -> original grid: original axis j is canonical axis ornt[j, 0],
        # reversed where ornt[j, 1] is -1
        box, axes, flips = [], [], []
        for j in range(3):
            k, flip = int(self.inverse_ornt[j, 0]), self.inverse_ornt[j, 1] < 0
            c0, c1 = (self.bbox[k][0] + v for v in window[k])
            size = self.orig_shape[j]
            box.append(slice(size - c1, size - c0) if flip else slice(c0, c1))
            axes.append(k)
            flips.append(flip)
        mask = np.transpose(mask, axes)
        mask = np.flip(mask, [j for j in range(3) if flips[j]]) if any(flips) else mask
        return tuple(box), mask
