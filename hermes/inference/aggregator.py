"""Aggregation of patch predictions into a whole-volume result (TorchIO-like ``add_batch`` /
``finalize``), with Gaussian or constant blending, fused output reduction and a streaming mode.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from hermes.inference import _workspace
from hermes.ops import aggregate as ops

__all__ = ["OUTPUT_KINDS", "PatchAggregator", "best_stream_axis", "resolve_device"]

#: User-facing output kinds of :class:`PatchAggregator` and ``sliding_window_inference``.
OUTPUT_KINDS = ("logits", "probs", "masks", "labels")
#: a plane sink's planes are finalised in chunks of up to this many planes and bytes (one
#: parallel region per chunk: per plane, threads wait on each other when the CPU is busy)
PLANES_PER_CHUNK = 8
CHUNK_BYTES = 32 << 20
#: streamed along the last axis, a chunk's planes are the runs the finalisation vectorises
#: over: up to this many, and at most an eighth of the ring (3-4x faster than 2 at 16)
PLANES_PER_CHUNK_LAST_AXIS = 16


def _is_int(value: object) -> bool:
    """An integer (Python, NumPy or a 0-d integer tensor), not a bool."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _spatial_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    if _is_int(value):
        value = (value,) * ndim  # type: ignore[assignment]
    out = tuple(value)  # type: ignore[arg-type]
    if len(out) != ndim or not all(_is_int(v) for v in out):
        raise ValueError(f"{name} must be an int or {ndim} ints, got {value!r}")
    return tuple(int(v) for v in out)


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device with an index for CUDA (``"cuda"`` -> the current one).

    Tensors created on ``"cuda"`` report ``cuda:<current>``, which does not compare equal to
    ``torch.device("cuda")``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "cpu":
        dev = torch.device("cpu")  # "cpu:0": CPU tensors report plain "cpu"
    return dev


def best_stream_axis(spatial_shape: Sequence[int], roi_size: Sequence[int]) -> int:
    """The spatial axis whose streaming needs the fewest accumulator voxels (ties: the first).

    Streaming along axis ``a`` keeps ``roi[a] * prod(shape[i] for i != a)`` voxels per channel.
    """
    shape, roi = tuple(spatial_shape), tuple(roi_size)
    sizes = [
        roi[a] * math.prod(s for i, s in enumerate(shape) if i != a) for a in range(len(shape))
    ]
    return int(min(range(len(shape)), key=lambda a: (sizes[a], a)))


class PatchAggregator:
    """Accumulates weighted patch predictions of one image and reduces them to the output.

    Each added patch ``p`` (``C x roi``) at corner ``s`` contributes ``p * w`` and ``w`` to the
    voxels it covers, ``w`` being the window weight (MONAI's Gaussian importance map or ones);
    ``finalize`` divides the sums and writes the requested output. Voxels sum their
    contributions in the order patches were added, so results are deterministic.

    Args:
        spatial_shape: ``(D, H, W)`` or ``(H, W)`` of the volume the patches tile, in voxels.
        channels: number of predictor output channels (tasks) ``C``.
        roi_size: window size, an int or one per spatial axis; must fit in ``spatial_shape``.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian sigma as a fraction of the window size (one value or per axis).
        output: ``"logits"`` (averaged logits, float32, or float16 with ``output_dtype``),
            ``"probs"`` (sigmoid of them, float16 by default), ``"masks"`` (bool ``C x ...``,
            probability >= ``threshold`` per task) or ``"labels"`` (``1 x ...``, uint8 when
            ``C < 256`` else uint16: 1 + the task of highest probability where that probability
            is >= ``threshold``, else 0).
        threshold: probability threshold of masks and labels, in (0, 1); applied exactly, as
            ``logit >= log(t / (1 - t))``.
        output_dtype: float32 or float16 for logits/probs.
        streaming: keep only a window-deep slab of accumulators along ``stream_axis``: patches
            must then be added with non-decreasing corner coordinate along that axis, and the
            planes that no later patch can reach are finalised (and their memory reused) as soon
            as that coordinate advances.
        stream_axis: spatial axis of the streaming (0 = first). Accumulators then take
            ``(C + 1) x roi[a] x (the other two sizes)`` floats: the longest axis relative to the
            window saves the most (``best_stream_axis`` picks it). Any axis keeps a ring of
            planes, rows or columns and reads patches in their own layout.
        device: where accumulators and the output live.
        crop: ``(lo, hi)`` per spatial axis: only that region is written to the output
            (sliding-window inference uses it to drop padding). Default: everything.
        out: optional preallocated output of the final (cropped) shape, contiguous, of the
            output dtype (its contents are overwritten). For float32 logits without streaming
            it is the accumulator itself: it must then be uncropped (``C x D x H x W``).
        reuse_buffers: take accumulators from a cache of zeroed buffers (much faster on the CPU
            than fresh memory); they are handed back on ``finalize``.
        plane_sink: streaming only: instead of writing an output volume, pass each finalised
            plane along ``stream_axis`` to ``plane_sink(index, plane)``, ``index`` counting
            along that axis of the (cropped) output and ``plane`` its values
            (``output_shape`` with that axis of size 1, a view into one of two buffers of
            planes used in turn: it stays valid until the sink's next call returns, so a sink
            may look one plane ahead). ``finalize`` then returns None. A consumer that keeps
            only part of each plane needs no output volume at all.
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        channels: int,
        roi_size: int | Sequence[int],
        *,
        mode: str = "gaussian",
        sigma_scale: float | Sequence[float] = 0.125,
        output: str = "logits",
        threshold: float = 0.5,
        output_dtype: torch.dtype | None = None,
        streaming: bool = False,
        stream_axis: int = 0,
        device: torch.device | str = "cpu",
        crop: Sequence[tuple[int, int]] | None = None,
        out: torch.Tensor | None = None,
        reuse_buffers: bool = True,
        plane_sink: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(
                f"spatial_shape must be 2 or 3 positive sizes ((H, W) or (D, H, W)), got {shape}"
            )
        self.spatial_ndim = len(shape)
        if not _is_int(channels) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        channels = int(channels)
        roi = _spatial_tuple(roi_size, self.spatial_ndim, "roi_size")
        for r, s in zip(roi, shape, strict=True):
            if r < 1 or r > s:
                raise ValueError(
                    f"roi_size {roi} must be >= 1 and fit in the volume {shape} on every axis "
                    "(pad the volume, or use sliding_window_inference which pads for you)"
                )
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        self.device = resolve_device(device)
        self.channels = channels
        self.output = output
        self.streaming = bool(streaming)
        self.reuse_buffers = bool(reuse_buffers)
        if not _is_int(stream_axis) or not 0 <= stream_axis < self.spatial_ndim:
            raise ValueError(
                f"stream_axis must be a spatial axis in [0, {self.spatial_ndim}), "
                f"got {stream_axis!r}"
            )
        stream_axis = int(stream_axis)
        # the ring's axis in (z, y, x) (2-D images get a unit z)
        self._ring_axis = stream_axis + 3 - self.spatial_ndim if self.streaming else 0
        if plane_sink is not None and (not self.streaming or out is not None
                                       or not callable(plane_sink)):
            raise ValueError("plane_sink needs streaming=True, no out, and a callable")
        self._sink = plane_sink
        self._shape3 = shape if len(shape) == 3 else (1, *shape)
        self._roi3 = roi if len(roi) == 3 else (1, *roi)
        if crop is None:
            crop3 = tuple((0, s) for s in self._shape3)
        else:
            crop = tuple((int(lo), int(hi)) for lo, hi in crop)
            if len(crop) != self.spatial_ndim or any(
                not 0 <= lo < hi <= s for (lo, hi), s in zip(crop, shape, strict=True)
            ):
                raise ValueError(f"crop must be one (lo, hi) per axis inside {shape}, got {crop}")
            crop3 = crop if len(crop) == 3 else ((0, 1), *crop)
        self._crop3: tuple[tuple[int, int], ...] = tuple(crop3)
        if isinstance(sigma_scale, numbers.Real) or (
            isinstance(sigma_scale, torch.Tensor) and sigma_scale.dim() == 0
        ):
            sig3 = (float(sigma_scale),) * 3
        else:
            sig3 = tuple(float(v) for v in sigma_scale)
            if len(sig3) != self.spatial_ndim:
                raise ValueError(f"sigma_scale must be one value or one per axis, got {sig3}")
            sig3 = sig3 if len(sig3) == 3 else (1.0, *sig3)
        self._tables = ops.window_tables(self._roi3, mode, sig3, device=self.device)

        # output kind -> kernel kind
        self._sigmoid = output == "probs"
        self._threshold = 0.0
        if output in ("logits", "probs"):
            default = torch.float32 if output == "logits" else torch.float16
            dtype = default if output_dtype is None else output_dtype
            if dtype not in (torch.float32, torch.float16):
                raise ValueError(f"output_dtype must be float32 or float16, got {dtype}")
            self._kind = ops.OUTPUT_FLOAT32 if dtype == torch.float32 else ops.OUTPUT_FLOAT16
            out_channels = channels
        else:
            if output_dtype is not None:
                raise ValueError(f"output_dtype applies to logits/probs, not {output!r}")
            self._threshold = ops.logit_threshold(threshold)
            if output == "masks":
                self._kind = ops.OUTPUT_MASK
                out_channels = channels
            else:
                self._kind = ops.OUTPUT_LABEL_U8 if channels < 256 else ops.OUTPUT_LABEL_U16
                out_channels = 1
        self.output_dtype = ops._OUTPUT_DTYPES[self._kind]
        crop_shape = tuple(hi - lo for lo, hi in self._crop3)[3 - self.spatial_ndim :]
        self.output_shape: tuple[int, ...] = (out_channels, *crop_shape)

        D, H, W = self._shape3
        self._in_place = (
            self._kind == ops.OUTPUT_FLOAT32 and not self._sigmoid and not self.streaming
        )
        # accumulator planes x rows x columns: the volume's, or a ring of the window's size
        ring = self._roi3[self._ring_axis] if self.streaming else D
        self._ring = ring
        dims = [D, H, W]
        dims[self._ring_axis] = ring
        self._buffer: torch.Tensor | None = None
        if self._in_place:
            if out is not None:
                self._check_tensor(out, (channels, D, H, W), torch.float32, "out")
                self._acc = ops.zero_(out.view(channels, D, H, W))
            else:
                self._acc = torch.zeros(
                    (channels, D, H, W), dtype=torch.float32, device=self.device
                )
            self._buffer = _workspace.acquire(D * H * W, self.device, self.reuse_buffers)
            self._wsum = self._buffer.view(D, H, W)
            self._out = self._acc
        else:
            n = math.prod(dims)
            self._buffer = _workspace.acquire((channels + 1) * n, self.device, self.reuse_buffers)
            self._acc = self._buffer[: channels * n].view(channels, *dims)
            self._wsum = self._buffer[channels * n :].view(*dims)
            if plane_sink is not None:  # two chunks of output planes, used in turn
                chunk_shape = list(self.output_shape_3d)
                plane_bytes = math.prod(chunk_shape) // chunk_shape[1 + self._ring_axis] * (
                    self.output_dtype.itemsize)
                if self._ring_axis == 2:
                    cap = min(PLANES_PER_CHUNK_LAST_AXIS, ring // 8)
                else:
                    cap = min(PLANES_PER_CHUNK, CHUNK_BYTES // max(plane_bytes, 1))
                self._chunk = max(1, min(chunk_shape[1 + self._ring_axis], cap))
                chunk_shape[1 + self._ring_axis] = self._chunk
                self._out = torch.empty((2, *chunk_shape), dtype=self.output_dtype,
                                        device=self.device)
            elif out is not None:
                self._check_tensor(out, self.output_shape_3d, self.output_dtype, "out")
                self._out = out.view(self.output_shape_3d)
            else:
                self._out = torch.empty(
                    self.output_shape_3d, dtype=self.output_dtype, device=self.device
                )
        self._chunks = 0  # chunks of planes handed to the plane sink
        self._failed = False  # the plane sink raised: the sums of its planes are lost
        self._done = 0  # planes (rows) [0, _done) along the ring axis are final (streaming)
        self._z = 0  # current (largest) patch corner along the ring axis (streaming)
        self._finalized = False

    # ------------------------------------------------------------------------------------------
    @property
    def output_shape_3d(self) -> tuple[int, int, int, int]:
        """The output shape with a unit depth axis for 2-D volumes."""
        c = self.output_shape[0]
        return (c, *(hi - lo for lo, hi in self._crop3))  # type: ignore[return-value]

    @property
    def accumulator_bytes(self) -> int:
        """Bytes of accumulator memory (accumulator plus weight sum) this aggregator uses."""
        return 4 * (self._acc.numel() + self._wsum.numel())

    def _check_tensor(self, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, name: str):
        """``t`` must be contiguous, of ``dtype`` and ``shape`` (``C x 1 x H x W`` or
        ``C x H x W`` for 2-D volumes)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        shapes = [tuple(shape)]
        if self.spatial_ndim == 2:
            shapes.append((shape[0], *shape[2:]))
        if t.dtype != dtype or tuple(t.shape) not in shapes or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
                f"{t.dtype} {tuple(t.shape)}"
            )
        if t.device != self.device:
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")

    # ------------------------------------------------------------------------------------------
    def add_batch(
        self, patches: torch.Tensor, locations: torch.Tensor | Sequence[Sequence[int]]
    ) -> None:
        """Adds a batch of patch predictions.

        Args:
            patches: ``B x C x roi`` predictions (logits), any float dtype and device.
            locations: ``B x n`` (start corners, ``n`` = spatial dims) or ``B x 2n`` (TorchIO
                style: starts then ends, ends exclusive) voxel coordinates in the volume.
        """
        self._check_usable()
        if self._finalized:
            raise RuntimeError("this aggregator was already finalised")
        nd = self.spatial_ndim
        if not isinstance(patches, torch.Tensor):
            raise TypeError(f"patches must be a tensor, got {type(patches).__name__}")
        if patches.dim() != nd + 2:
            raise ValueError(
                f"patches must be B x C x {'x'.join('dhw'[3 - nd:])} ({nd + 2}-D), got shape "
                f"{tuple(patches.shape)}"
            )
        roi = self._roi3[3 - nd :]
        if tuple(patches.shape[1:]) != (self.channels, *roi):
            raise ValueError(
                f"patches must have shape (B, {self.channels}, {', '.join(map(str, roi))}), got "
                f"{tuple(patches.shape)}"
            )
        if not patches.is_floating_point():
            raise TypeError(f"patches must be floating point, got {patches.dtype}")
        loc = torch.as_tensor(locations, device="cpu")
        if loc.dtype == torch.bool or loc.is_complex() or (
            loc.is_floating_point() and not bool((loc == loc.round()).all())
        ):
            raise ValueError(f"locations must be integer voxel coordinates, got {locations}")
        loc = loc.to(torch.int64)
        B = int(patches.shape[0])
        if loc.dim() != 2 or loc.shape[0] != B or loc.shape[1] not in (nd, 2 * nd):
            raise ValueError(
                f"locations must be B x {nd} (corners) or B x {2 * nd} (corners, ends) with "
                f"B = {B}, got shape {tuple(loc.shape)}"
            )
        if loc.shape[1] == 2 * nd:
            extent = loc[:, nd:] - loc[:, :nd]
            if bool((extent != torch.tensor(roi)).any()):
                raise ValueError(f"location ends - starts must equal the window size {roi}")
            loc = loc[:, :nd]
        if nd == 2:
            loc = torch.cat([torch.zeros(B, 1, dtype=torch.int64), loc], dim=1)
            patches = patches.unsqueeze(2)
        if B == 0:
            return
        hi = torch.tensor([s - r for s, r in zip(self._shape3, self._roi3, strict=True)])
        if bool((loc < 0).any()) or bool((loc > hi).any()):
            raise ValueError(
                f"patch locations must keep the window inside the volume {self._shape3[3 - nd:]}"
            )
        loc = loc.contiguous()
        if not self.streaming:
            ops.add_patches(self._acc, self._wsum, patches, loc, self._tables)
            return
        zs = loc[:, self._ring_axis].tolist()
        begin = 0
        for i in range(B + 1):
            if i < B and zs[i] == zs[begin]:
                continue
            z = zs[begin]
            if z < self._z:
                raise ValueError(
                    "streaming aggregation needs non-decreasing patch corners along the stream "
                    f"axis (got {z} after {self._z}); use streaming=False for arbitrary order"
                )
            if z > self._z:
                self._flush(z)
                self._z = z
            ops.add_patches(
                self._acc, self._wsum, patches[begin:i], loc[begin:i], self._tables,
                ring_axis=self._ring_axis,
            )  # fmt: skip
            begin = i

    def _flush(self, until: int) -> None:
        """Finalises planes (rows, columns) [_done, until) along the ring's axis into the output
        and resets their accumulators."""
        a, ring = self._ring_axis, self._ring
        crop = list(self._crop3)
        s = self._done
        while s < until:
            e = min(until, s + ring)
            lo, hi = max(s, crop[a][0]), min(e, crop[a][1])
            for p in [*range(s, min(lo, e)), *range(max(hi, s), e)]:
                self._acc.select(1 + a, p % ring).zero_()  # outside the crop: just reset
                self._wsum.select(a, p % ring).zero_()
            if lo < hi:
                # finalize resets all rows and columns of its planes; planes outside the crop
                # (a ring of rows or columns) are reset here
                span = [(0, n) for n in self._shape3]
                span[0], span[a] = crop[0], (lo, hi)
                if a > 0:
                    at = torch.arange(lo, hi, device=self.device) % ring
                    for part in (slice(0, crop[0][0]), slice(crop[0][1], None)):
                        self._acc[:, part].index_fill_(1 + a, at, 0.0)
                        self._wsum[part].index_fill_(a, at, 0.0)
                if self._sink is None:
                    ops.finalize(
                        self._acc, self._wsum, span[0], self._out, kind=self._kind,
                        crop=crop[1:], out_z0=crop[0][0], rows=span[1], cols=span[2],
                        sigmoid=self._sigmoid, threshold=self._threshold, zero_after=True,
                    )  # fmt: skip
                else:
                    self._finalize_planes(span, lo, hi)
            s = e
        self._done = max(self._done, until)

    def _check_usable(self) -> None:
        if self._failed:
            raise RuntimeError("the plane sink raised while this aggregator finalised planes: "
                               "their sums are lost; start again with a new aggregator")

    def _finalize_planes(self, span: list[tuple[int, int]], lo: int, hi: int) -> None:
        """``_flush`` with a ``plane_sink``: planes ``[lo, hi)`` along the ring's axis, a chunk
        at a time into the two chunk buffers in turn, each plane handed to the sink."""
        a, crop, k = self._ring_axis, list(self._crop3), self._chunk
        for p0 in range(lo, hi, k):
            p1 = min(p0 + k, hi)
            span[a] = (p0, p1)
            at = list(crop)
            at[a] = (p0, p0 + k)  # the chunk buffer holds these planes (rows, columns) only
            buf = self._out[self._chunks % 2]
            self._chunks += 1
            ops.finalize(
                self._acc, self._wsum, span[0], buf, kind=self._kind,
                crop=at[1:], out_z0=at[0][0], rows=span[1], cols=span[2],
                sigmoid=self._sigmoid, threshold=self._threshold, zero_after=True,
            )  # fmt: skip
            if self.spatial_ndim == 2:
                buf = buf.squeeze(1)
            try:
                for p in range(p0, p1):
                    self._sink(p - crop[a][0],
                               buf.narrow(1 + a - (3 - self.spatial_ndim), p - p0, 1))
            except BaseException:
                # these planes' sums are spent: no way on. The accumulators (not zeroed) are
                # dropped, not handed back to the buffer cache
                self._failed, self._buffer = True, None
                raise

    def finalize(self) -> torch.Tensor | None:
        """Finishes the aggregation and returns the output (``output_shape``, on ``device``).

        Voxels no patch covered have a zero weight sum: their logits are NaN (0/0). With a
        ``plane_sink`` the last planes go to the sink and None is returned.
        """
        self._check_usable()
        if self._finalized:
            raise RuntimeError("finalize() was already called")
        self._finalized = True
        if self._in_place:
            self._acc.div_(self._wsum)
            result = self._acc[(slice(None), *(slice(lo, hi) for lo, hi in self._crop3))]
            ops.zero_(self._wsum)
        else:
            self._flush(self._shape3[self._ring_axis])
            result = self._out
        assert self._buffer is not None
        _workspace.release(self._buffer, self.reuse_buffers)
        self._buffer = None
        if self._sink is not None:
            self._out = None
            return None
        if self.spatial_ndim == 2:
            result = result.squeeze(1)
        return result
