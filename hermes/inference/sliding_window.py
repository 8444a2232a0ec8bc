"""Sliding-window inference with native, memory-bounded patch aggregation.

``sliding_window_inference`` takes MONAI's arguments and, with the defaults, returns MONAI's
result (same windows, same weights, same summation order, float32 accumulation), so code can
switch by changing an import. Extensions (keyword-only): ``output`` (reduce to probabilities,
masks or a label map in the same pass), ``streaming`` (accumulators for one window-deep slab
only), ``tta`` (mirroring test-time augmentation).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hermes.inference.aggregator import (
    OUTPUT_KINDS,
    PatchAggregator,
    _is_int,
    best_stream_axis,
    resolve_device,
)
from hermes.ops import aggregate as agg_ops

__all__ = ["sliding_window_inference", "window_starts", "extract_logits"]

_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _as_str(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]
) -> list[tuple[int, ...]]:
    """Window corners in MONAI's order (first axis slowest) for an image at least roi-sized.

    The step along an axis is ``int(roi * (1 - overlap))`` (at least 1; the whole axis when
    the window covers it), and the last window is shifted back to end at the border.

    Args:
        image_size: spatial size, each ``>= roi_size``.
        roi_size: window size per axis.
        overlap: overlap fraction per axis in [0, 1).

    Returns:
        One tuple of start coordinates per window.
    """
    per_axis = []
    for size, roi, ov in zip(image_size, roi_size, overlap, strict=True):
        step = roi if roi == size else max(int(roi * (1 - ov)), 1)
        count = 1
        while (count - 1) * step + roi < size:
            count += 1
        per_axis.append([min(i * step, size - roi) for i in range(count)])
    return list(itertools.product(*per_axis))


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a predictor's output.

    Accepts a tensor, a tuple/list (its first element), an object with ``seg_logits`` (the
    Hermes model's output) or a mapping with key ``"seg_logits"``.
    """
    if isinstance(output, torch.Tensor):
        return output.as_tensor() if hasattr(output, "as_tensor") else output  # MetaTensor
    if hasattr(output, "seg_logits"):
        return extract_logits(output.seg_logits)
    if isinstance(output, Mapping):
        if "seg_logits" in output:
            return output["seg_logits"]
        raise TypeError(
            "predictor returned a mapping without 'seg_logits'; return a tensor, a tuple "
            f"(logits first) or an object with .seg_logits (got keys {sorted(output)})"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "predictor must return a tensor, a tuple/list whose first element is the logits tensor, "
        f"or an object with .seg_logits; got {type(output).__name__}"
    )


def _flatten_outputs(output: Any) -> tuple[list[Any] | None, list[torch.Tensor]]:
    """A predictor's output as (dict keys or None, outputs), as MONAI flattens it: a tensor, an
    object with ``seg_logits`` or a mapping with key ``"seg_logits"`` (the Hermes model's logits)
    are one output; any other mapping is one output per key (sorted) and a tuple/list starting
    with a tensor one per element."""
    if isinstance(output, torch.Tensor) or hasattr(output, "seg_logits"):
        return None, [extract_logits(output)]
    if isinstance(output, Mapping):
        if "seg_logits" in output:
            return None, [extract_logits(output)]
        keys = sorted(output)
        if keys and all(isinstance(output[k], torch.Tensor) for k in keys):
            return keys, [extract_logits(output[k]) for k in keys]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        # other elements that are no tensors (None, numbers) are dropped by the caller
        return None, [extract_logits(t) if isinstance(t, torch.Tensor) else t for t in output]
    raise TypeError(
        "predictor must return a tensor, a tuple/list or mapping of tensors, or an object with "
        f".seg_logits; got {type(output).__name__}"
    )


def _window_shaped(t: Any, batch: int, roi: Sequence[int]) -> bool:
    """Whether ``t`` is a ``batch x C x roi`` tensor (an output the windows can be added from)."""
    return (isinstance(t, torch.Tensor) and t.dim() == len(roi) + 2 and t.shape[0] == batch
            and tuple(t.shape[2:]) == tuple(roi))


def _pack_outputs(keys: list[Any] | None, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`_flatten_outputs` (one output: the tensor itself, as in MONAI)."""
    if keys is not None:
        return dict(zip(keys, tensors, strict=True))
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _scalar(value: Any) -> Any:
    """Torch scalars (0-d tensors) as Python numbers; NumPy scalars are kept, so that window
    steps are computed in their precision, as MONAI does."""
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def _per_axis(value: Any, ndim: int, name: str) -> tuple:
    """One value per spatial axis from a scalar or a sequence (NumPy / torch scalars, arrays
    and tensors included, as MONAI accepts them)."""
    value = _scalar(value)
    if isinstance(value, numbers.Real) or value is None:
        return (value,) * ndim
    if not isinstance(value, Iterable) or isinstance(value, str):
        raise ValueError(f"{name} must be a number or one number per spatial axis, got {value!r}")
    seq = tuple(_scalar(v) for v in value)
    if len(seq) != ndim:
        raise ValueError(
            f"{name} must be one value or {ndim} values (one per spatial axis), got {value!r}"
        )
    return seq


def _mirror_predictor(predictor: Callable[..., Any], axes: Sequence[int]) -> Callable[..., Any]:
    """Averages each of the predictor's outputs over all mirrorings along ``axes`` (tensor
    dims); a ``condition`` keyword tensor (windowed like the image) is mirrored with the
    windows."""
    combos = [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]

    def predict(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        totals: list[torch.Tensor] = []
        keys = None
        condition = kwargs.get("condition")
        for dims in combos:
            xi = torch.flip(x, dims) if dims else x
            if dims and isinstance(condition, torch.Tensor):
                kwargs["condition"] = torch.flip(condition, dims)
            keys, outs = _flatten_outputs(predictor(xi, *args, **kwargs))
            outs = [o for o in outs if isinstance(o, torch.Tensor)]
            for k, yi in enumerate(outs):
                if not (torch.is_grad_enabled() and yi.requires_grad):  # gradients kept
                    yi = yi.detach()
                yi = torch.flip(yi, dims) if dims else yi
                if k == len(totals):
                    # a copy: the predictor's output may be its input, a reused buffer or an
                    # inference tensor, none of which may be summed into in place
                    totals.append(yi.to(torch.float32, copy=True))
                elif totals[k].requires_grad or yi.requires_grad:
                    totals[k] = totals[k] + yi
                else:
                    totals[k].add_(yi)
        return _pack_outputs(keys, [t / len(combos) if t.requires_grad else t.div_(len(combos))
                                    for t in totals])

    return predict


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int] | int,
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Sequence[float] | float = 0.25,
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    roi_weight_map: torch.Tensor | None = None,
    process_fn: Callable | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    output: str = "logits",
    threshold: float = 0.5,
    output_dtype: torch.dtype | None = None,
    streaming: bool = False,
    stream_axis: int | str = 0,
    tta: bool | Sequence[int] = False,
    reuse_buffers: bool = True,
    plane_sink: Callable[[int, int, torch.Tensor], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Sliding-window inference of ``predictor`` over ``inputs``, aggregated natively.

    Arguments up to ``with_coord`` are MONAI's (same meaning, order and defaults); the default
    result equals ``monai.inferers.sliding_window_inference``: averaged logits (accumulated in
    float32) in the predictor's output structure, of the inputs' floating dtype, a MetaTensor
    with the inputs' metadata for a MetaTensor input, and differentiable when the predictor's
    outputs require gradients (then accumulated with autograd, as MONAI does: slower, the
    whole volume, ``streaming`` ignored; masks and labels are never differentiable).

    Args:
        inputs: ``N x C_in x D x H x W`` (or ``N x C_in x H x W``) image batch.
        roi_size: window size, an int or one per spatial axis; ``None``/non-positive entries
            take the image size. Images smaller than the window are padded (``padding_mode``,
            ``cval``) and the output cropped back.
        sw_batch_size: windows per predictor call (>= 1); windows of consecutive images of the
            batch may share a call, as in MONAI.
        predictor: called as ``predictor(windows, *args, **kwargs)`` with ``b x C_in x roi``
            windows on ``sw_device``; returns ``b x C x roi`` logits as a tensor, an object
            with ``.seg_logits`` (the Hermes model), or several as a tuple/list or mapping of
            tensors (each aggregated; returned in the same structure).
        overlap: window overlap fraction in [0, 1), one value or one per axis.
        mode: ``"constant"`` (uniform) or ``"gaussian"`` blending.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        cval: constant padding value.
        sw_device: device of the windows (the predictor's); default the inputs' device.
        device: device of the accumulators and the output; default the inputs' device.
        progress: show a tqdm progress bar over predictor calls.
        roi_weight_map, process_fn: not supported (must be None).
        buffer_steps, buffer_dim: accepted for compatibility and ignored (use ``streaming``).
        with_coord: pass the windows' slices to the predictor as its second argument.
        args, kwargs: extra arguments of the predictor; a ``condition`` tensor (``N x C' x
            spatial``) is padded and windowed like the inputs, as in MONAI. The keywords below
            are ours and never reach the predictor (bind such arguments with
            ``functools.partial``).
        output: ``"logits"`` (default; averaged logits, float32 for integer inputs),
            ``"probs"`` (sigmoid, float16 unless ``output_dtype``), ``"masks"`` (bool per
            task, probability >= ``threshold``) or ``"labels"`` (``N x 1 x ...`` uint8, uint16
            for >= 256 tasks: 1 + argmax over tasks where the top probability is
            >= ``threshold``, else 0).
        threshold: probability threshold of masks/labels, in (0, 1).
        output_dtype: float32 or float16 for logits/probs.
        streaming: visit windows slab by slab along ``stream_axis`` and finalise each slab
            as soon as no later window touches it; accumulators then take
            ``(C + 1) x roi_d x H x W`` floats (along axis 0) instead of ``C x D x H x W``.
            Along axis 0 results are identical to ``streaming=False``.
        stream_axis: spatial axis to stream along (with ``streaming``): 0 (default; MONAI's
            window order, bit-identical results), another axis, or ``"auto"`` (the axis that
            needs the least accumulator memory, e.g. an in-plane axis of a 512 x 512 CT).
            Along another axis than 0 windows are visited with that axis slowest, which changes
            the summation order (results equal to float rounding) and the predictor batches.
        tta: mirroring test-time augmentation: True mirrors all spatial axes, a sequence of
            spatial axis indices (0 = first spatial axis) mirrors those; logits of all
            ``2^k`` mirrorings are averaged per window.
        reuse_buffers: reuse cached zeroed accumulator buffers between calls
            (``hermes.inference.clear_workspace()`` frees them).
        plane_sink: with ``streaming``, one image and a predictor with one output: no output
            volume is kept; each finalised plane is passed to ``plane_sink(axis, index,
            plane)`` instead: ``axis`` the streamed spatial axis, ``index`` the plane's position
            along it in the (cropped) output, ``plane`` its ``C x spatial`` values with that
            axis of size 1 (valid until the sink's next call returns: copy what is kept).
            Planes come in increasing ``index``; the function then returns None.

    Returns:
        ``N x C x spatial`` (``N x 1 x spatial`` for labels) on ``device``; a tuple or dict of
        them for predictors with several outputs; None with a ``plane_sink``.
    """
    # ---- validation -----------------------------------------------------------------------
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    meta_source = None
    if hasattr(inputs, "as_tensor"):  # MONAI MetaTensor: the result gets its metadata
        from monai.data import MetaTensor

        meta_source = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
        inputs = inputs.as_tensor()
    if inputs.dim() not in (4, 5):
        raise ValueError(
            "inputs must be N x C x H x W (2-D) or N x C x D x H x W (3-D), got shape "
            f"{tuple(inputs.shape)} ({inputs.dim()}-D)"
        )
    nd = inputs.dim() - 2
    if inputs.shape[0] == 0 or any(s == 0 for s in inputs.shape[1:]):
        raise ValueError(f"inputs must not be empty, got shape {tuple(inputs.shape)}")
    if isinstance(roi_size, Sequence) and len(roi_size) != nd:
        raise ValueError(
            f"roi_size {tuple(roi_size)} has {len(roi_size)} values but the inputs have {nd} "
            f"spatial dims (shape {tuple(inputs.shape)}; channel-first N x C x spatial expected)"
        )
    if not _is_int(sw_batch_size) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    sw_batch_size = int(sw_batch_size)
    if not callable(predictor):
        raise TypeError("predictor must be callable")
    if roi_weight_map is not None or process_fn is not None:
        raise NotImplementedError("roi_weight_map and process_fn are not supported")
    del buffer_steps, buffer_dim  # memory is bounded by `streaming` instead
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    overlaps = _per_axis(overlap, nd, "overlap")
    for o in overlaps:
        if not isinstance(o, numbers.Real) or not 0.0 <= float(o) < 1.0:
            raise ValueError(f"overlap must be in [0, 1) on every axis, got {overlap!r}")
    mode_s = _as_str(mode)
    if mode_s not in ("constant", "gaussian"):
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    pad_s = _as_str(padding_mode)
    if pad_s not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}")
    sigma_arg: float | tuple[float, ...] = 1.0  # unused in constant mode (MONAI ignores it)
    if mode_s == "gaussian":
        sigmas = _per_axis(sigma_scale, nd, "sigma_scale")
        if not all(isinstance(s, numbers.Real) and math.isfinite(s) and s > 0 for s in sigmas):
            raise ValueError(f"sigma_scale must be positive, got {sigma_scale!r}")
        sigma_arg = tuple(float(s) for s in sigmas)
    # the reduction's arguments, checked before the first predictor call
    if output in ("logits", "probs"):
        if output_dtype not in (None, torch.float32, torch.float16):
            raise ValueError(f"output_dtype must be float32 or float16, got {output_dtype}")
    elif output_dtype is not None:
        raise ValueError(f"output_dtype applies to logits/probs, not {output!r}")
    else:
        agg_ops.logit_threshold(threshold)
    if plane_sink is not None and (not streaming or inputs.shape[0] != 1
                                   or not callable(plane_sink)):
        raise ValueError("plane_sink needs streaming=True, one image (N = 1) and a callable")
    if stream_axis != "auto":
        if not _is_int(stream_axis) or not 0 <= stream_axis < nd:
            raise ValueError(
                f"stream_axis must be 'auto' or a spatial axis in [0, {nd}), got {stream_axis!r}"
            )
        stream_axis = int(stream_axis)
    if tta is True:
        tta_axes: tuple[int, ...] = tuple(range(nd))
    elif tta is False or tta is None:
        tta_axes = ()
    else:
        axes = (
            [_scalar(a) for a in tta] if isinstance(tta, Iterable) and not isinstance(tta, str)
            else None
        )  # fmt: skip
        if (
            axes is None
            or any(not _is_int(a) or not 0 <= a < nd for a in axes)
            or len(set(axes)) != len(axes)
        ):
            raise ValueError(
                f"tta must be a bool or distinct spatial axes in [0, {nd}), got {tta!r}"
            )
        tta_axes = tuple(int(a) for a in axes)

    N = int(inputs.shape[0])
    image_size_ = [int(s) for s in inputs.shape[2:]]
    condition = kwargs.pop("condition", None)  # MONAI: windowed like the inputs
    if condition is not None and (
        not isinstance(condition, torch.Tensor)
        or condition.dim() != inputs.dim()
        or condition.shape[0] != N
        or list(condition.shape[2:]) != image_size_
    ):
        raise ValueError(
            "condition must be a tensor N x C_cond x spatial matching the inputs "
            f"{tuple(inputs.shape)}, got {getattr(condition, 'shape', type(condition))}"
        )
    raw_roi = _per_axis(roi_size, nd, "roi_size")
    roi: list[int] = []
    for r, s in zip(raw_roi, image_size_, strict=True):
        if r is not None and not _is_int(r):
            raise ValueError(f"roi_size must contain ints, got {roi_size!r}")
        roi.append(s if r is None or r <= 0 else int(r))
    device = resolve_device(device) if device is not None else inputs.device
    sw_device = resolve_device(sw_device) if sw_device is not None else inputs.device

    # ---- padding (images smaller than the window) ----------------------------------------
    pad: list[int] = []
    for k in range(nd - 1, -1, -1):  # F.pad order: last axis first
        diff = max(roi[k] - image_size_[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        if pad_s == "reflect" and any(
            max(pad[2 * (nd - 1 - k)], pad[2 * (nd - 1 - k) + 1]) >= image_size_[k]
            for k in range(nd)
        ):
            raise ValueError(
                f"reflect padding needs the image {tuple(image_size_)} to be larger than half "
                f"the padding to the window {tuple(roi)}; use padding_mode='constant' or "
                "'replicate'"
            )
        # torch refuses a value argument for the other modes
        value = {"value": cval} if pad_s == "constant" else {}
        inputs = F.pad(inputs, pad=pad, mode=pad_s, **value)
        if condition is not None:
            condition = F.pad(condition, pad=pad, mode=pad_s, **value)
    image_size = [int(s) for s in inputs.shape[2:]]
    crop = [(pad[2 * (nd - 1 - k)], pad[2 * (nd - 1 - k)] + image_size_[k]) for k in range(nd)]

    # ---- windows ------------------------------------------------------------------------
    starts = window_starts(image_size, roi, overlaps)
    axis = 0
    if streaming:
        axis = best_stream_axis(image_size, roi) if stream_axis == "auto" else int(stream_axis)
        if axis != 0:  # visit windows with the streamed axis slowest (stable: MONAI order within)
            starts = sorted(starts, key=lambda s: s[axis])
    num_win = len(starts)
    total = num_win * N
    run = _mirror_predictor(predictor, [a + 2 for a in tta_axes]) if tta_axes else predictor

    aggregators: dict[tuple[int, int], PatchAggregator | _AutogradAggregator] = {}
    results: list[Any] = []  # per output: the batch tensor, or per image (autograd)
    channels: list[int] = []
    keys: list[Any] | None = None
    differentiable = False
    batches = range(0, total, sw_batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="windows", unit="batch" if sw_batch_size > 1 else "window")
    for first in batches:
        idx = list(range(first, min(first + sw_batch_size, total)))
        slices = [
            (slice(i // num_win, i // num_win + 1), slice(None))
            + tuple(slice(s, s + r) for s, r in zip(starts[i % num_win], roi, strict=True))
            for i in idx
        ]
        # as MONAI: a copy whenever batches may hold several windows, else a view
        if sw_batch_size > 1:
            windows = torch.cat([inputs[s] for s in slices]).to(sw_device)
        else:
            windows = inputs[slices[0]].to(sw_device)
        if condition is not None:
            kwargs["condition"] = torch.cat([condition[s] for s in slices]).to(sw_device)
        if with_coord:
            raw = run(windows, [list(s) for s in slices], *args, **kwargs)
        else:
            raw = run(windows, *args, **kwargs)
        batch_keys, outs = _flatten_outputs(raw)
        if batch_keys is None and len(outs) > 1 and not all(
            _window_shaped(t, len(idx), roi) for t in outs[1:]
        ):  # e.g. deep supervision at lower resolutions: not aggregated (MONAI zooms them)
            if not channels:
                warnings.warn(
                    "the predictor's tuple holds outputs that are not b x C x roi windows; only "
                    "its first element is aggregated", stacklevel=2)
            outs = outs[:1]
        for logits in outs:
            if logits.dim() != nd + 2:
                raise ValueError(
                    f"predictor output must be b x C x roi ({nd + 2}-D), got {tuple(logits.shape)}"
                )
            if logits.shape[0] != len(idx) or tuple(logits.shape[2:]) != tuple(roi):
                raise ValueError(
                    f"predictor output must have shape ({len(idx)}, C, "
                    f"{', '.join(map(str, roi))}) for a batch of {len(idx)} windows, got "
                    f"{tuple(logits.shape)} (outputs at another resolution than the window are "
                    "not supported)"
                )
        if not channels:
            keys = batch_keys
            channels = [int(t.shape[1]) for t in outs]
            # MONAI keeps gradients: with them, a differentiable (slower) accumulation
            differentiable = (
                torch.is_grad_enabled() and output in ("logits", "probs")
                and any(t.requires_grad for t in outs)
            )  # fmt: skip
            if plane_sink is not None and (differentiable or len(outs) > 1):
                raise ValueError("plane_sink takes one predictor output without gradients")
            for c in channels:
                results.append([None] * N if differentiable or plane_sink is not None
                               else _allocate_results(N, c, image_size, crop, output,
                                                      output_dtype, streaming, device))
        elif batch_keys != keys or [int(t.shape[1]) for t in outs] != channels:
            raise ValueError(
                f"predictor returned {len(outs)} output(s) with {[t.shape[1] for t in outs]} "
                f"channels, earlier {len(channels)} with {channels}"
            )
        # windows of image n form one run of consecutive indices
        j = 0
        while j < len(idx):
            n = idx[j] // num_win
            k = j
            while k < len(idx) and idx[k] // num_win == n:
                k += 1
            locs = torch.tensor([starts[i % num_win] for i in idx[j:k]], dtype=torch.int64)
            last = idx[k - 1] % num_win == num_win - 1  # last window of image n
            for o, logits in enumerate(outs):
                agg = aggregators.get((n, o))
                if agg is None:
                    if differentiable:
                        agg = _AutogradAggregator(image_size, tuple(roi), mode_s, sigma_arg,
                                                  device)
                    else:
                        agg = PatchAggregator(
                            image_size, channels[o], tuple(roi), mode=mode_s,
                            sigma_scale=sigma_arg, output=output, threshold=threshold,
                            output_dtype=output_dtype, streaming=streaming, stream_axis=axis,
                            device=device, crop=crop, out=results[o][n],
                            reuse_buffers=reuse_buffers,
                            plane_sink=(None if plane_sink is None
                                        else functools.partial(plane_sink, axis)),
                        )  # fmt: skip
                    aggregators[(n, o)] = agg
                agg.add_batch(logits[j:k], locs)
                if last:
                    if differentiable:
                        results[o][n] = agg.finalize(crop, output, output_dtype)
                    else:
                        agg.finalize()
                    del aggregators[(n, o)]
            j = k
        # drop this batch before the next predictor call: only one batch of predictions alive
        del raw, outs, logits, windows
    if plane_sink is not None:
        return None
    final = []
    for res in results:
        if differentiable:
            res = torch.stack(res)
        elif output == "logits" and output_dtype in (None, torch.float32) and not streaming:
            # the accumulators were the results (full padded size): crop like MONAI (a view)
            res = res[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in crop))]
        if output == "logits" and output_dtype is None and inputs.dtype.is_floating_point:
            res = res.to(inputs.dtype)  # MONAI returns the inputs' dtype (float32 here)
        if meta_source is not None:
            from monai.utils import convert_to_dst_type

            res = convert_to_dst_type(res, meta_source, dtype=res.dtype, device=res.device)[0]
        final.append(res)
    return _pack_outputs(keys, final)


class _AutogradAggregator:
    """Weighted accumulation of one image's patches with autograd (as MONAI: slice additions),
    for predictor outputs that require gradients; float32, the whole (padded) volume."""

    def __init__(self, image_size: Sequence[int], roi: tuple[int, ...], mode: str,
                 sigma: float | tuple[float, ...], device: torch.device) -> None:
        nd = len(roi)
        sig3 = (1.0, *sigma) if isinstance(sigma, tuple) and nd == 2 else sigma
        if not isinstance(sig3, tuple):
            sig3 = (float(sig3),) * 3
        roi3 = roi if nd == 3 else (1, *roi)
        weight = agg_ops.weight_map(agg_ops.window_tables(roi3, mode, sig3, device=device))
        self._weight = weight if nd == 3 else weight[0]
        self._roi = roi
        self._acc: torch.Tensor | None = None
        self._wsum = torch.zeros(tuple(image_size), dtype=torch.float32, device=device)

    def add_batch(self, patches: torch.Tensor, locations: torch.Tensor) -> None:
        device = self._wsum.device
        for patch, start in zip(patches, locations.tolist(), strict=True):
            box = tuple(slice(a, a + r) for a, r in zip(start, self._roi, strict=True))
            if self._acc is None:
                self._acc = torch.zeros((patch.shape[0], *self._wsum.shape),
                                        dtype=torch.float32, device=device)
            self._acc[(slice(None), *box)] += patch.to(device, torch.float32) * self._weight
            self._wsum[box] += self._weight

    def finalize(self, crop: Sequence[tuple[int, int]], output: str,
                 output_dtype: torch.dtype | None) -> torch.Tensor:
        assert self._acc is not None
        res = (self._acc / self._wsum)[(slice(None), *(slice(lo, hi) for lo, hi in crop))]
        if output == "probs":
            res = torch.sigmoid(res).to(output_dtype or torch.float16)
        elif output_dtype is not None:
            res = res.to(output_dtype)
        return res


def _allocate_results(
    N: int,
    channels: int,
    image_size: Sequence[int],
    crop: Sequence[tuple[int, int]],
    output: str,
    output_dtype: torch.dtype | None,
    streaming: bool,
    device: torch.device,
) -> torch.Tensor:
    """The batch output tensor, which the per-image aggregators fill in."""
    cropped = [hi - lo for lo, hi in crop]
    if output == "logits" and output_dtype in (None, torch.float32) and not streaming:
        # the aggregators' accumulators (each zeroes its image's part)
        return torch.empty((N, channels, *image_size), dtype=torch.float32, device=device)
    if output in ("logits", "probs"):  # output_dtype checked by the caller
        default = torch.float32 if output == "logits" else torch.float16
        dtype = default if output_dtype is None else output_dtype
        return torch.empty((N, channels, *cropped), dtype=dtype, device=device)
    if output == "masks":
        return torch.empty((N, channels, *cropped), dtype=torch.bool, device=device)
    dtype = torch.uint8 if channels < 256 else torch.uint16
    return torch.empty((N, 1, *cropped), dtype=dtype, device=device)
