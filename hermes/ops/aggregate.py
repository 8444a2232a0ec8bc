"""Weighted patch aggregation kernels for sliding-window inference (front end).

The accumulator of one image is a float32 tensor ``acc`` of shape ``C x R x H x W`` plus a weight
sum ``wsum`` of shape ``R x H x W``. Global voxel ``(z, y, x)`` lives at ``(z % R, y % H,
x % W)``: with the volume's sizes this is the whole volume; with ``R`` (``H``, ``W``) equal to
the window's size along that axis it is a ring of planes (rows, columns) that only holds the
slab that windows still touch (streaming along that axis, see ``ring_axis``).

Window weights are separable tables, ``w[z, y, x] = max((wz[z] * wy[y]) * wx[x], clamp_min)``
in float32, which reproduces MONAI's ``compute_importance_map`` bit for bit without storing a
weight volume. Patches are added one after another, so every voxel sums its contributions in the
same order on every run and on both devices (no atomics: deterministic).

This module validates arguments, dispatches to ``hermes._C`` (CPU always, CUDA when compiled) and
holds pure-PyTorch references (``*_reference``) used as test oracle and as the fallback for
devices the extension was not built for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hermes.ops._extension import cuda_kernels_usable, extension, extension_loaded

__all__ = [
    "OUTPUT_FLOAT32",
    "OUTPUT_FLOAT16",
    "OUTPUT_MASK",
    "OUTPUT_LABEL_U8",
    "OUTPUT_LABEL_U16",
    "WindowTables",
    "window_tables",
    "weight_map",
    "logit_threshold",
    "add_patches",
    "add_patches_reference",
    "finalize",
    "finalize_reference",
    "zero_",
]

# Output kinds of finalize(); the values are those of hermes::aggregate::OutputKind.
OUTPUT_FLOAT32 = 0
OUTPUT_FLOAT16 = 1
OUTPUT_MASK = 2
OUTPUT_LABEL_U8 = 3
OUTPUT_LABEL_U16 = 4

_OUTPUT_DTYPES = {
    OUTPUT_FLOAT32: torch.float32,
    OUTPUT_FLOAT16: torch.float16,
    OUTPUT_MASK: torch.bool,
    OUTPUT_LABEL_U8: torch.uint8,
    OUTPUT_LABEL_U16: torch.uint16,
}


@dataclass(frozen=True)
class WindowTables:
    """Separable window weights of a ``roi_d x roi_h x roi_w`` window.

    Attributes:
        tables: float32 tensor of length ``roi_d + roi_h + roi_w`` (``wz``, ``wy``, ``wx``
            concatenated) on the device of the accumulator.
        roi: ``(roi_d, roi_h, roi_w)`` in voxels.
        clamp_min: lower bound applied to the product (0 for constant blending).
    """

    tables: torch.Tensor
    roi: tuple[int, int, int]
    clamp_min: float

    def to(self, device: torch.device | str) -> WindowTables:
        """The same tables on ``device``."""
        return WindowTables(self.tables.to(device), self.roi, self.clamp_min)

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(wz, wy, wx)`` views."""
        d, h, _ = self.roi
        return self.tables[:d], self.tables[d : d + h], self.tables[d + h :]


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    # Same float32 expression as MONAI's compute_importance_map, evaluated on the CPU.
    x = torch.arange(
        start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device="cpu"
    )
    return torch.exp(x**2 / (-2 * sigma**2))


def window_tables(
    roi_size: Sequence[int],
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str = "cpu",
) -> WindowTables:
    """Weight tables of a 3-D window (2-D windows: pass ``(1, h, w)``).

    Args:
        roi_size: ``(roi_d, roi_h, roi_w)`` window size in voxels, each >= 1.
        mode: ``"gaussian"`` (MONAI's Gaussian importance map, clamped below at 1e-3) or
            ``"constant"`` (all weights 1).
        sigma_scale: Gaussian sigma as a fraction of the window size, per axis or one value;
            for a 2-D window given as ``(1, h, w)``, a 2-sequence applies to ``(h, w)``.
        device: where the tables are stored (the accumulator's device).

    Returns:
        The tables; ``weight_map`` expands them for inspection.
    """
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive ints (d, h, w), got {tuple(roi_size)}")
    mode = str(getattr(mode, "value", mode)).lower()
    if mode == "constant":
        tables = torch.ones(sum(roi), dtype=torch.float32)
        return WindowTables(tables.to(device), roi, 0.0)  # type: ignore[arg-type]
    if mode != "gaussian":
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    if isinstance(sigma_scale, (int, float)):
        scales = [float(sigma_scale)] * 3
    else:
        scales = [float(s) for s in sigma_scale]
        if len(scales) == 2:
            scales = [1.0, *scales]
        if len(scales) != 3:
            raise ValueError(f"sigma_scale must be a float or one value per axis, got {scales}")
    if min(scales) <= 0 or not all(math.isfinite(s) for s in scales):
        raise ValueError(f"sigma_scale must be positive and finite, got {scales}")
    parts = [_gaussian_1d(r, r * s) for r, s in zip(roi, scales, strict=True)]
    # MONAI clamps the product at max(min(map), 1e-3) (1e-3 also where the product underflows
    # to 0). The minimum of the float32 product is the product of the per-axis minima, in
    # MONAI's order (rounding is monotonic).
    mins = [float(p.min()) for p in parts]
    smallest = float(np.float32(np.float32(mins[0] * np.float32(mins[1])) * np.float32(mins[2])))
    clamp = float(np.float32(max(smallest, 1e-3)))
    return WindowTables(torch.cat(parts).to(device), roi, clamp)  # type: ignore[arg-type]


def weight_map(tables: WindowTables) -> torch.Tensor:
    """The ``roi_d x roi_h x roi_w`` float32 weight volume the kernels apply (for tests)."""
    wz, wy, wx = tables.split()
    full = (wz[:, None, None] * wy[None, :, None]) * wx[None, None, :]
    return torch.clamp(full, min=tables.clamp_min)


def logit_threshold(probability: float) -> float:
    """Float32 threshold ``t`` on averaged logits ``v`` with ``v >= t  <=>  sigmoid(v) >= p``.

    The comparison is exact (made against ``log(p / (1 - p))`` in float64), so masks and labels
    do not depend on how a sigmoid rounds near the threshold.

    Args:
        probability: threshold ``p`` on the probability, strictly between 0 and 1.
    """
    p = float(probability)
    if not 0.0 < p < 1.0:
        raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {p}")
    exact = math.log(p) - math.log1p(-p)
    t = np.float32(exact)
    if float(t) < exact:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_accumulator(acc: torch.Tensor, wsum: torch.Tensor) -> tuple[int, int, int, int]:
    if not isinstance(acc, torch.Tensor) or not isinstance(wsum, torch.Tensor):
        raise TypeError("acc and wsum must be tensors")
    if acc.dim() != 4 or acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError(
            f"acc must be a contiguous float32 C x R x H x W tensor, got {acc.dtype} "
            f"{tuple(acc.shape)} (contiguous={acc.is_contiguous()})"
        )
    if wsum.shape != acc.shape[1:] or wsum.dtype != torch.float32 or not wsum.is_contiguous():
        raise ValueError(
            f"wsum must be a contiguous float32 tensor of shape {tuple(acc.shape[1:])}, got "
            f"{wsum.dtype} {tuple(wsum.shape)}"
        )
    if wsum.device != acc.device:
        raise ValueError(f"acc is on {acc.device} but wsum on {wsum.device}")
    if acc.numel() == 0:
        raise ValueError(f"acc must not be empty, got shape {tuple(acc.shape)}")
    return tuple(int(s) for s in acc.shape)  # type: ignore[return-value]


def _native(device: torch.device, name: str):
    """The extension function ``name`` for ``device``, or None (use the reference)."""
    if not extension_loaded() or (device.type == "cuda" and not cuda_kernels_usable()):
        return None
    return getattr(extension(), f"{name}_{device.type}", None)


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _call(fn, device: torch.device, *args) -> None:
    """Calls a native kernel; CUDA kernels on ``device``'s current stream, with it current."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn(*args, _stream(device))
    else:
        fn(*args)


def _starts_tensor(starts: torch.Tensor | Sequence[Sequence[int]], count: int) -> torch.Tensor:
    s = torch.as_tensor(starts, dtype=torch.int64, device="cpu")
    if s.shape != (count, 3):
        raise ValueError(
            f"starts must have shape ({count}, 3) (z, y, x corners), got {tuple(s.shape)}"
        )
    return s.contiguous()


# ----------------------------------------------------------------------------------------------
# add


def add_patches(
    acc: torch.Tensor,
    wsum: torch.Tensor,
    patches: torch.Tensor,
    starts: torch.Tensor | Sequence[Sequence[int]],
    tables: WindowTables,
    *,
    add_weight: bool = True,
    ring_axis: int = 0,
    use_native: bool = True,
) -> None:
    """Adds weighted patches into the accumulator, in place, in the order given.

    Args:
        acc: float32 ``C x R x H x W`` accumulator (contiguous), updated in place.
        wsum: float32 ``R x H x W`` weight sum, updated in place when ``add_weight``.
        patches: ``B x C x roi_d x roi_h x roi_w`` predictions, any strides (converted to
            float32 on ``acc``'s device when needed; a unit stride along the last axis is the
            fast path).
        starts: ``B x 3`` global corners ``(z, y, x)`` of the patches, in voxels; a patch spans
            at most ``R`` planes (planes always wrap) and fits in ``H`` and ``W``, except along
            ``ring_axis``, where it spans at most ``H`` rows (``W`` columns).
        tables: window weights (see ``window_tables``) of size ``roi``.
        add_weight: also accumulate the weights into ``wsum``.
        ring_axis: 1 (2): rows (columns) wrap too, global ``y`` (``x``) unbounded; 0: only
            planes do.
        use_native: False forces the pure-PyTorch reference (for tests).
    """
    C, R, H, W = _check_accumulator(acc, wsum)
    if patches.dim() != 5:
        raise ValueError(f"patches must be B x C x d x h x w, got shape {tuple(patches.shape)}")
    B = int(patches.shape[0])
    rd, rh, rw = tables.roi
    if tuple(patches.shape[1:]) != (C, rd, rh, rw):
        raise ValueError(
            f"patches must have shape (B, {C}, {rd}, {rh}, {rw}) to match the accumulator's "
            f"channels and the window size, got {tuple(patches.shape)}"
        )
    if rd > R:
        raise ValueError(f"a window spans {rd} planes but the accumulator holds only {R}")
    s = _starts_tensor(starts, B)
    if B == 0:
        return
    if int(s.min()) < 0:
        raise ValueError("patch corners must be non-negative")
    if ring_axis not in (0, 1, 2):
        raise ValueError(f"ring_axis must be 0, 1 or 2, got {ring_axis!r}")
    for axis, (span, size, name) in enumerate([(rh, H, "rows"), (rw, W, "columns")], start=1):
        if axis == ring_axis and span > size:
            raise ValueError(f"a window spans {span} {name} but the accumulator holds only {size}")
        if axis != ring_axis and int(s[:, axis].max()) + span > size:
            raise ValueError(f"a patch extends past the accumulator's H x W = {H} x {W}")
    if tables.tables.device != acc.device:
        tables = tables.to(acc.device)
    # any strided float32 layout is read in place (e.g. a transposed view); other dtypes and
    # devices are converted first
    p = patches.detach().to(device=acc.device, dtype=torch.float32)
    fn = _native(acc.device, "aggregate_add") if use_native else None
    if fn is None:
        add_patches_reference(acc, wsum, p, s, tables, add_weight=add_weight)
        return
    wz, wy, wx = tables.split()
    args = [
        acc.data_ptr(), wsum.data_ptr(), C, R, H, W, p.data_ptr(), list(p.stride()),
        s.data_ptr(), B,
        wz.data_ptr(), wy.data_ptr(), wx.data_ptr(), rd, rh, rw, float(tables.clamp_min),
        bool(add_weight),
    ]  # fmt: skip
    _call(fn, acc.device, *args)


def add_patches_reference(
    acc: torch.Tensor,
    wsum: torch.Tensor,
    patches: torch.Tensor,
    starts: torch.Tensor,
    tables: WindowTables,
    *,
    add_weight: bool = True,
) -> None:
    """Pure-PyTorch ``add_patches`` (same arguments, already validated)."""
    R, H, W = acc.shape[1:]
    rd, rh, rw = tables.roi
    w = weight_map(tables.to(acc.device))
    for b in range(patches.shape[0]):
        z, y, x = (int(v) for v in starts[b])
        planes = (torch.arange(rd, device=acc.device) + z) % R
        rows = (torch.arange(rh, device=acc.device) + y) % H
        cols = (torch.arange(rw, device=acc.device) + x) % W
        region = (slice(None), planes[:, None, None], rows[None, :, None], cols[None, None, :])
        acc[region] = acc[region] + patches[b].to(acc.device) * w
        if add_weight:
            wsum[region[1:]] = wsum[region[1:]] + w


# ----------------------------------------------------------------------------------------------
# finalize


def finalize(
    acc: torch.Tensor,
    wsum: torch.Tensor,
    z_range: tuple[int, int],
    out: torch.Tensor,
    *,
    kind: int,
    crop: Sequence[tuple[int, int]] | None = None,
    out_z0: int = 0,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    sigmoid: bool = False,
    threshold: float = 0.0,
    zero_after: bool = False,
    use_native: bool = True,
) -> None:
    """Normalises planes ``[z0, z1)`` (``rows``, ``cols``) by the weight sum; writes ``out``.

    With ``v = acc / wsum`` per voxel: ``OUTPUT_FLOAT32``/``OUTPUT_FLOAT16`` write ``v`` (or
    ``sigmoid(v)``) as float32/float16 (``out``: ``C x Do x Ho x Wo``); ``OUTPUT_MASK`` writes
    ``v >= threshold`` as bool (``C x ...``); ``OUTPUT_LABEL_U8/U16`` write one plane
    (``1 x Do x Ho x Wo``, uint8/uint16) with ``1 + argmax_c v`` (ties: lowest channel) where
    ``max_c v >= threshold``, else 0.

    Args:
        acc, wsum: the accumulator (see ``add_patches``).
        z_range: global planes ``(z0, z1)`` to finalise, ``z1 - z0 <= R``.
        out: output tensor on ``acc``'s device, contiguous, dtype given by ``kind``.
        kind: one of the ``OUTPUT_*`` constants.
        crop: ``((y0, y1), (x0, x1))`` global rows/columns written (default: all); output voxel
            ``(z, y, x)`` goes to ``out[:, z - out_z0, y - y0, x - x0]``.
        out_z0: global plane stored at ``out[:, 0]``.
        rows: global rows ``(r0, r1)`` of the planes to finalise, ``r1 - r0 <= H`` (a ring of
            rows, see ``add_patches``' ``ring_axis``); default ``(0, H)``, and then the crop must
            lie within ``H``.
        cols: the same for columns (``W``).
        sigmoid: float kinds only: apply the logistic function.
        threshold: mask/label kinds: threshold on the averaged logit (see ``logit_threshold``).
        zero_after: reset ``acc`` and ``wsum`` on planes ``[z0, z1)`` x ``rows`` x ``cols``
            after reading.
        use_native: False forces the pure-PyTorch reference (for tests).
    """
    C, R, H, W = _check_accumulator(acc, wsum)
    z0, z1 = int(z_range[0]), int(z_range[1])
    if not (0 <= z0 <= z1) or z1 - z0 > R:
        raise ValueError(f"z_range {z_range} must satisfy 0 <= z0 <= z1 <= z0 + {R}")
    (y0, y1), (x0, x1) = crop if crop is not None else ((0, H), (0, W))
    spans = []
    for span, size, lim, name in [(rows, H, y1, "rows"), (cols, W, x1, "cols")]:
        if span is None:
            span = (0, size)
            if lim > size:
                raise ValueError(f"crop {crop} must lie within H x W = {H} x {W}")
        lo, hi = int(span[0]), int(span[1])
        if not (0 <= lo <= hi) or hi - lo > size:
            raise ValueError(f"{name} {span} must satisfy 0 <= lo <= hi <= lo + {size}")
        spans.append((lo, hi))
    (r0, r1), (q0, q1) = spans
    if not (0 <= y0 <= y1 and 0 <= x0 <= x1):
        raise ValueError(f"crop {crop} must lie within H x W = {H} x {W}")
    if kind not in _OUTPUT_DTYPES:
        raise ValueError(f"unknown output kind {kind}")
    want = _OUTPUT_DTYPES[kind]
    channels = 1 if kind in (OUTPUT_LABEL_U8, OUTPUT_LABEL_U16) else C
    if kind == OUTPUT_LABEL_U8 and C > 255:
        raise ValueError(f"{C} channels do not fit uint8 labels; use OUTPUT_LABEL_U16")
    if kind == OUTPUT_LABEL_U16 and C > 65535:
        raise ValueError(f"{C} channels do not fit uint16 labels")
    if out.dtype != want or out.dim() != 4 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous 4-D {want} tensor, got {out.dtype} {tuple(out.shape)}"
        )
    if out.device != acc.device:
        raise ValueError(f"out is on {out.device} but the accumulator on {acc.device}")
    Do, Ho, Wo = (int(s) for s in out.shape[1:])
    if int(out.shape[0]) != channels or Ho != y1 - y0 or Wo != x1 - x0:
        raise ValueError(
            f"out must have shape ({channels}, D, {y1 - y0}, {x1 - x0}), got {tuple(out.shape)}"
        )
    if z1 > z0 and (z0 - out_z0 < 0 or z1 - out_z0 > Do):
        raise ValueError(f"planes [{z0}, {z1}) do not fit out (depth {Do}) from plane {out_z0}")
    fn = _native(acc.device, "aggregate_finalize") if use_native else None
    if fn is None:
        finalize_reference(
            acc, wsum, (z0, z1), out, kind=kind, crop=((y0, y1), (x0, x1)), out_z0=out_z0,
            rows=(r0, r1), cols=(q0, q1), sigmoid=sigmoid, threshold=threshold,
            zero_after=zero_after,
        )  # fmt: skip
        return
    args = [
        acc.data_ptr(), wsum.data_ptr(), C, R, H, W, [z0, z1, r0, r1, q0, q1, y0, y1, x0, x1],
        int(out_z0), out.data_ptr(), Do, Ho, Wo, int(kind), bool(sigmoid), float(threshold),
        bool(zero_after),
    ]  # fmt: skip
    _call(fn, acc.device, *args)


def finalize_reference(
    acc: torch.Tensor,
    wsum: torch.Tensor,
    z_range: tuple[int, int],
    out: torch.Tensor,
    *,
    kind: int,
    crop: Sequence[tuple[int, int]],
    out_z0: int = 0,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    sigmoid: bool = False,
    threshold: float = 0.0,
    zero_after: bool = False,
) -> None:
    """Pure-PyTorch ``finalize`` (same arguments, already validated)."""
    R, H, W = acc.shape[1:]
    z0, z1 = z_range
    r0, r1 = rows if rows is not None else (0, H)
    q0, q1 = cols if cols is not None else (0, W)
    (y0, y1), (x0, x1) = crop

    def box(ys: tuple[int, int], xs: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Stored indices of planes [z0, z1) x rows ys x columns xs (broadcast)."""
        dev = acc.device
        return (
            (torch.arange(z0, z1, device=dev) % R)[:, None, None],
            (torch.arange(*ys, device=dev) % H)[None, :, None],
            (torch.arange(*xs, device=dev) % W)[None, None, :],
        )

    ya, yb, xa, xb = max(r0, y0), min(r1, y1), max(q0, x0), min(q1, x1)  # written
    if z0 < z1 and ya < yb and xa < xb:
        at = box((ya, yb), (xa, xb))
        target = out[:, z0 - out_z0 : z1 - out_z0, ya - y0 : yb - y0, xa - x0 : xb - x0]
        _write_output(acc[(slice(None), *at)] / wsum[at], target, kind, sigmoid, threshold)
    if zero_after and z0 < z1 and r0 < r1 and q0 < q1:
        at = box((r0, r1), (q0, q1))
        acc[(slice(None), *at)] = 0
        wsum[at] = 0


def _write_output(
    v: torch.Tensor, target: torch.Tensor, kind: int, sigmoid: bool, threshold: float
) -> None:
    """Writes the averaged logits ``v`` (``C x ...``) as output ``kind`` into ``target``."""
    if kind in (OUTPUT_FLOAT32, OUTPUT_FLOAT16):
        if sigmoid:
            v = torch.sigmoid(v)
        target.copy_(v.to(target.dtype))
    elif kind == OUTPUT_MASK:
        target.copy_(v >= threshold)
    else:
        best, arg = v.max(dim=0, keepdim=True)
        label = torch.where(best >= threshold, arg + 1, torch.zeros_like(arg))
        target.copy_(label.to(torch.int32).to(target.dtype))


def zero_(buffer: torch.Tensor) -> torch.Tensor:
    """Zeroes a contiguous float32 tensor in place (parallel native fill) and returns it."""
    if buffer.dtype != torch.float32 or not buffer.is_contiguous():
        raise ValueError("zero_ needs a contiguous float32 tensor")
    fn = _native(buffer.device, "aggregate_zero")
    if fn is None or buffer.numel() == 0:
        return buffer.zero_()
    _call(fn, buffer.device, buffer.data_ptr(), buffer.numel())
    return buffer
