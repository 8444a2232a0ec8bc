"""Per-task masks stored as their bounding-box crops.

A universal model segments tens of structures: dense ``T x X x Y x Z`` masks of a
512 x 512 x 300 CT with 40 tasks take 3 GiB, the crops of organ-sized structures a few MiB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["TaskMasks", "bounding_box"]

Box = tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray) -> Box | None:
    """The smallest box holding every True voxel of a 3-D ``mask``; None when it has none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


class TaskMasks(Sequence[np.ndarray]):
    """``T`` boolean masks on one ``(X, Y, Z)`` grid, each kept as the crop of its bounding box.

    ``masks[t]`` is task ``t``'s dense ``(X, Y, Z)`` mask (a new array), ``np.asarray(masks)``
    the dense ``T x X x Y x Z`` stack (other indices, e.g. ``masks[:, 10]``, index that stack),
    ``masks.shape`` its shape; :meth:`box` gives the crop itself and :meth:`count` its voxel
    count without building the dense mask.
    """

    dtype = np.dtype(bool)
    ndim = 4

    def __init__(self, shape: Sequence[int]) -> None:
        self._grid = tuple(int(s) for s in shape)
        self._items: list[tuple[Box, np.ndarray] | None] = []

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> TaskMasks:
        """From a ``T x X x Y x Z`` array."""
        masks = np.asarray(masks)
        if masks.ndim != 4:
            raise ValueError(f"masks must be T x X x Y x Z, got shape {masks.shape}")
        out = cls(masks.shape[1:])
        for m in masks:
            out.append(m)
        return out

    def append(self, mask: np.ndarray | None, box: Box | None = None) -> None:
        """Add the next task's mask: dense ``(X, Y, Z)``, or the part of the grid at ``box``
        (False elsewhere); None for an empty mask. Kept as its tight bounding-box crop."""
        if mask is None:
            self._items.append(None)
            return
        mask = np.asarray(mask, bool)
        region = box if box is not None else tuple(slice(0, s) for s in self._grid)
        if tuple(s.stop - s.start for s in region) != mask.shape:
            raise ValueError(f"mask of shape {mask.shape} does not fill its box {region}")
        tight = bounding_box(mask)
        if tight is None:
            self._items.append(None)
            return
        where = tuple(slice(r.start + t.start, r.start + t.stop)
                      for r, t in zip(region, tight, strict=True))
        self._items.append((where, mask[tight].copy()))  # type: ignore[arg-type]

    def box(self, index: int) -> tuple[Box, np.ndarray] | None:
        """``(box, crop)`` of task ``index`` (``crop`` is the mask inside ``box``); None when
        its mask is empty."""
        return self._items[index]

    def count(self, index: int) -> int:
        """Voxels of task ``index``'s mask."""
        item = self._items[index]
        return 0 if item is None else int(np.count_nonzero(item[1]))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._items), *self._grid)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes held by the crops."""
        return sum(item[1].nbytes for item in self._items if item is not None)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> np.ndarray:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):  # slices, masks...: of the dense stack
            return np.asarray(self)[index]
        dense = np.zeros(self._grid, bool)
        item = self._items[int(index)]
        if item is not None:
            dense[item[0]] = item[1]
        return dense

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        for i, item in enumerate(self._items):
            if item is not None:
                out[i][item[0]] = item[1]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"TaskMasks(shape={self.shape}, {self.nbytes / 2**20:.1f} MiB of crops)"
