"""Per-task probabilities on the model grid, kept only where their masks can need them.

``hermes.segment`` thresholds each task's probabilities after mapping them linearly back to the
original grid. A linearly interpolated value reaches the threshold only if one of the 2 x 2 x 2
samples it interpolates does (up to float32 rounding: ``THRESHOLD_MARGIN``), and every sample
of such a stencil lies within one voxel (along each axis) of that one. So the masks need exact
values only within one voxel of the voxels at or above ``threshold - THRESHOLD_MARGIN`` (the
"hits"); elsewhere any value below that level gives the same masks, and 0 is stored.

:class:`SparseProbabilities` receives the planes of a streamed sliding window (its
``plane_sink``) and keeps, per task and plane, the box that holds that plane's share of those
voxels: organ-sized structures of a many-task model keep a small part of the
``T x X x Y x Z`` float32 volume that the masks were computed from before (a body and 40 organs
on a 512 x 512 x 400 CT: the peak memory of ``hermes.segment`` halved, 6.97 -> 3.43 GiB,
``benchmarks/bench_many_tasks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hermes.inference.geometry import THRESHOLD_MARGIN

__all__ = ["SparseProbabilities"]

_EMPTY = 1 << 40  # an empty box is (lo, hi) = (_EMPTY, -_EMPTY): min/max unions keep it empty


def _no_boxes(n: int) -> np.ndarray:
    """``n x 4`` empty boxes (row lo, row hi, column lo, column hi)."""
    return np.tile(np.array([_EMPTY, -_EMPTY, _EMPTY, -_EMPTY], np.int64), (n, 1))


class SparseProbabilities:
    """Model-grid probabilities of ``channels`` tasks, stored near their hits only.

    Feed it the planes of ``sliding_window_inference(..., output="probs",
    output_dtype=torch.float32, streaming=True, plane_sink=store.add)``, call :meth:`finish`,
    then :meth:`task` gives each task's ``shape`` array: the exact probabilities within one
    voxel of every voxel ``>= threshold - THRESHOLD_MARGIN``, 0 elsewhere (below the
    threshold, as the true values there).

    Args:
        channels: number of tasks ``T``.
        shape: ``(X, Y, Z)`` of the volume the planes tile, in voxels.
        threshold: the probability threshold of the masks, in (0, 1).
    """

    def __init__(self, channels: int, shape: Sequence[int], threshold: float) -> None:
        self.channels = int(channels)
        self.shape = tuple(int(s) for s in shape)
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
        self.level = float(threshold) - THRESHOLD_MARGIN
        self._axis: int | None = None
        # per task: (plane index, row start, column start, values) of each stored piece
        self._pieces: list[list[tuple[int, int, int, np.ndarray]]] = [
            [] for _ in range(self.channels)]
        self._prev: np.ndarray | None = None  # hit boxes of the plane before the pending one
        self._pending: tuple[int, torch.Tensor, np.ndarray] | None = None
        self._next_index = 0
        self._buffer: np.ndarray | None = None  # task()'s output, reused
        self._dirty: tuple[slice, ...] | None = None  # where the buffer holds the last task
        self.nbytes = 0  # bytes of stored values

    # ---- filling -----------------------------------------------------------------------------
    def add(self, axis: int, index: int, plane: torch.Tensor) -> None:
        """A sliding window's next plane: ``plane`` (``T x ...`` with spatial ``axis`` of size
        1) at ``index`` along ``axis``; it must stay valid until the next call returns."""
        if axis != (axis if self._axis is None else self._axis) or index != self._next_index:
            raise ValueError(
                f"planes must come in order along one axis: got plane {index} of axis {axis}, "
                f"expected plane {self._next_index}"
                + ("" if self._axis is None else f" of axis {self._axis}"))
        want = (self.channels, *(1 if a == axis else s for a, s in enumerate(self.shape)))
        if tuple(plane.shape) != want or plane.dtype != torch.float32:
            raise ValueError(f"plane {index} must be float32 {want}, got {plane.dtype} "
                             f"{tuple(plane.shape)}")
        self._axis = int(axis)
        values = plane.squeeze(1 + axis)
        boxes = self._hit_boxes(values)
        if self._pending is not None:
            self._store(*self._pending, boxes)
        self._pending = (index, values, boxes)
        self._next_index += 1

    def finish(self) -> None:
        """Stores the last plane (after the last :meth:`add`)."""
        if self._next_index != (self.shape[self._axis] if self._axis is not None else -1):
            raise ValueError(f"{self._next_index} planes were added, the volume has "
                             f"{self.shape if self._axis is None else self.shape[self._axis]}")
        if self._pending is not None:
            self._store(*self._pending, _no_boxes(self.channels))
            self._pending = None

    def _hit_boxes(self, values: torch.Tensor) -> np.ndarray:
        """``T x 4`` (row lo, row hi, column lo, column hi) of each task's hits in one plane
        (``_EMPTY`` boxes where it has none)."""
        boxes = _no_boxes(self.channels)
        # NumPy, one thread: small per-plane torch ops stall on their thread barrier when the
        # CPU is busy (10x slower); NaN is no hit, as in thresholding
        hit = np.greater_equal(values.numpy(), self.level)
        for k, axis in ((0, 2), (2, 1)):  # rows: any over columns; columns: any over rows
            line = hit.any(axis=axis)  # T x rows (columns)
            some = line.any(axis=1)
            boxes[some, k] = line[some].argmax(axis=1)
            boxes[some, k + 1] = line.shape[1] - line[some, ::-1].argmax(axis=1)
        return boxes

    def _store(self, index: int, values: torch.Tensor, boxes: np.ndarray,
               next_boxes: np.ndarray) -> None:
        """Keeps plane ``index``'s values inside each task's hit boxes of this plane and its
        two neighbours, grown by one voxel."""
        prev = self._prev if self._prev is not None else _no_boxes(self.channels)
        both = np.stack([prev, boxes, next_boxes])
        lo = both[:, :, 0::2].min(axis=0) - 1  # (row, column) starts
        hi = both[:, :, 1::2].max(axis=0) + 1
        rows, cols = values.shape[1:]
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [rows, cols])
        arr = values.numpy()
        for t in np.flatnonzero((lo < hi).all(axis=1)).tolist():
            (r0, q0), (r1, q1) = lo[t], hi[t]
            piece = arr[t, r0:r1, q0:q1].copy()
            self._pieces[t].append((index, int(r0), int(q0), piece))
            self.nbytes += piece.nbytes
        self._prev = boxes

    # ---- reading -----------------------------------------------------------------------------
    def task(self, t: int) -> np.ndarray:
        """Task ``t``'s ``shape`` float32 array (exact near its hits, 0 elsewhere): a buffer
        that the next call reuses."""
        if self._pending is not None:
            raise RuntimeError("call finish() after the last plane")
        if not 0 <= t < self.channels:
            raise IndexError(f"task {t} of {self.channels}")
        if self._buffer is None:
            self._buffer = np.zeros(self.shape, np.float32)
        elif self._dirty is not None:
            self._buffer[self._dirty] = 0
        pieces = self._pieces[t]
        if not pieces:
            self._dirty = None
            return self._buffer
        a = self._axis
        assert a is not None
        others = [d for d in range(3) if d != a]
        where = [slice(None)] * 3
        box = [[s, 0] for s in self.shape]
        for index, r0, q0, piece in pieces:
            where[a] = index
            where[others[0]] = slice(r0, r0 + piece.shape[0])
            where[others[1]] = slice(q0, q0 + piece.shape[1])
            self._buffer[tuple(where)] = piece
            for d, s in zip(range(3), where, strict=True):
                lo, hi = (s, s + 1) if d == a else (s.start, s.stop)
                box[d] = [min(box[d][0], lo), max(box[d][1], hi)]
        self._dirty = tuple(slice(lo, hi) for lo, hi in box)
        return self._buffer
