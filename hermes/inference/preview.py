"""Preview PNG of a segmentation: three orthogonal slices with coloured overlays and a legend."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from hermes.data.geometry import reorient
from hermes.data.io import spacing_from_affine

if TYPE_CHECKING:
    from hermes.inference.result import SegmentationResult

__all__ = ["preview_png", "label_colors"]


def label_colors(n: int) -> np.ndarray:
    """``(n, 3)`` distinct RGB colours in [0, 1] for labels 1..n (tab10, the light tab20
    shades, then HSV)."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"](np.arange(20))[:, :3]
    base = np.concatenate([tab20[0::2], tab20[1::2]])
    if n <= 20:
        return base[:n]
    extra = matplotlib.colormaps["hsv"](np.linspace(0, 1, n - 20, endpoint=False))[:, :3]
    return np.concatenate([base, extra])


def _window(pixels: np.ndarray) -> tuple[float, float]:
    """Grey-level window: the 0.5 and 99.5 percentiles of the shown pixels."""
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def preview_png(result: SegmentationResult, dpi: int = 100) -> bytes:
    """PNG bytes: sagittal, coronal and axial slices (in RAS display orientation) through the
    centre of the segmented region (the volume centre when nothing is segmented), the image
    in grey with each label's colour overlaid, and a legend with the volumes in mL."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels, aff = reorient(result.labels, result.affine)
    image = None
    if result.image is not None:
        image, _ = reorient(result.image, result.affine)
    sp = spacing_from_affine(aff)
    fg = labels > 0
    centre = []  # per axis: the slice with the most labelled voxels (the middle when none)
    for axis in range(3):
        counts = fg.sum(axis=tuple(a for a in range(3) if a != axis))
        centre.append(int(np.argmax(counts)) if counts.any() else labels.shape[axis] // 2)
    n = len(result.task_names)
    colors = np.concatenate([np.zeros((1, 3)), label_colors(n)])
    # (title, sliced axis, (left, right, bottom, top) directions, pixel aspect)
    views = [("sagittal", 0, "PAIS", sp[2] / sp[1]), ("coronal", 1, "LRIS", sp[2] / sp[0]),
             ("axial", 2, "LRPA", sp[1] / sp[0])]
    cuts = []  # per view: (slice index, labels, image) with rows = second remaining axis
    for _, axis, _, _ in views:
        idx = [slice(None)] * 3
        idx[axis] = int(np.clip(centre[axis], 0, labels.shape[axis] - 1))
        grey = None if image is None else image[tuple(idx)].T
        cuts.append((idx[axis], labels[tuple(idx)].T, grey))
    # window from the shown slices (a percentile of a whole CT costs seconds)
    lo, hi = (0.0, 1.0) if image is None else _window(np.concatenate(
        [grey.ravel() for _, _, grey in cuts]))

    # the legend below the slices: 5 columns (8 from 41 names, smaller type), its rows add to
    # the figure's height so the slices keep theirs
    ncol = 5 if n <= 40 else 8
    font = 8 if n <= 40 else 6
    legend_in = 0.3 + ((n + ncol - 1) // ncol) * font / 46  # inches
    height = 4.2 + legend_in
    fig = Figure(figsize=(12, height), dpi=dpi)
    axes = fig.subplots(1, 3)
    for ax, (title, _, dirs, aspect), (at, lab, grey) in zip(axes, views, cuts, strict=True):
        grey = np.zeros(lab.shape) if grey is None else np.clip((grey - lo) / (hi - lo), 0, 1)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        over = lab > 0
        rgb[over] = 0.45 * rgb[over] + 0.55 * colors[lab[over].astype(int)]
        ax.imshow(rgb, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(f"{title} (slice {at})", fontsize=10)
        kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 9}
        ax.text(0.01, 0.5, dirs[0], ha="left", va="center", **kw)
        ax.text(0.99, 0.5, dirs[1], ha="right", va="center", **kw)
        ax.text(0.5, 0.01, dirs[2], ha="center", va="bottom", **kw)
        ax.text(0.5, 0.99, dirs[3], ha="center", va="top", **kw)
        ax.set_axis_off()
    vols = result.volumes_ml
    handles = [Patch(color=colors[i + 1], label=f"{name} ({vols[name]:.1f} ml)")
               for i, name in enumerate(result.task_names)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), ncol),
                   fontsize=font, frameon=False)
    from hermes.inference.result import detection_note

    mod = result.modality + detection_note(result.detection)
    fig.suptitle(f"Hermes segmentation, {mod}", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / height,
                        bottom=(legend_in + 0.1) / height)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
