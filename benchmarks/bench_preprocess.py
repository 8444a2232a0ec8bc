"""Preprocessing of one large image (what ``hermes.segment`` and ``hermes preprocess`` run per
case): time and peak memory of Hermes' pipeline against the same mathematics written the
straightforward way, side by side in one run.

Input: a synthetic chest-CT-sized volume, 512 x 512 x ``--slices`` float32 at 0.8 x 0.8 x 1 mm
(a body ellipse at 40 HU in -1024 HU air, Gaussian noise), or the same as MRI (``T1``: percentile
clipping). Steps: ``normalize`` (clip, z-score) and ``resample`` (to 1.5 mm, cubic B-spline,
separable), and the whole ``prepare_arrays`` (reorient, crop, both).

Baseline ("whole-volume"): one NumPy expression per operation on the whole volume, as
preprocessing code is usually written (``np.clip`` -> new array, ``x[sel]`` copies for the
statistics, ``(x - mean) / std``; per resampled axis an edge-padded copy, its spline
coefficients and four full-size tap arrays); not Hermes' earlier code, which kept some of these
temporaries. Its results are compared with Hermes' in the run (the largest absolute difference
is printed; 0 expected, float64-summed statistics aside). Peak memory is tracemalloc's
high-water mark of the step (NumPy reports its buffers to it) above the memory held before it.

Usage: ``python benchmarks/bench_preprocess.py [--slices 400] [--quick]``; writes
``benchmarks/results/preprocess_cpu[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

from hermes.data import geometry
from hermes.data.normalize import normalization_for, normalize
from hermes.data.preprocess import PreprocessParams, prepare_arrays

HERE = Path(__file__).resolve().parent


def phantom(slices: int, modality: str, size: int = 512) -> np.ndarray:
    """(1, size, size, slices) float32 body phantom (HU for CT, positive intensities else)."""
    rng = np.random.default_rng(0)
    x, y = np.mgrid[:size, :size] - size / 2
    body = (x / (0.47 * size)) ** 2 + (y / (0.39 * size)) ** 2 < 1
    vol = np.full((size, size, slices), -1024.0 if modality == "CT" else 0.0, np.float32)
    vol[body] = 40.0 if modality == "CT" else 300.0
    vol[body] += rng.normal(0, 20, size=(int(body.sum()), slices)).astype(np.float32)
    return vol[None]


# ---- the baseline: the same mathematics, whole-volume NumPy ------------------------------------
def normalize_whole(image: np.ndarray, modality: str) -> np.ndarray:
    spec = normalization_for(modality)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32)
        if spec.kind == "ct":
            sel = x > spec.body_threshold
            x = np.clip(x, *spec.clip)
        else:
            sel = x != 0
            lo, hi = (float(v) for v in np.percentile(x[sel], spec.percentiles))
            x = np.clip(x, lo, hi)
        vals = x[sel]
        mean, std = vals.mean(dtype=np.float64), vals.std(dtype=np.float64)
        out[c] = (x - np.float32(mean)) / np.float32(std)
    return out


def resample_whole(vol: np.ndarray, scale, offset, out_shape) -> np.ndarray:
    """Separable cubic B-spline (order 3, edge extension) with whole-volume temporaries."""
    pad = geometry._SPLINE_PAD
    axes = sorted(range(3), key=lambda a: out_shape[a] / vol.shape[a])
    for axis in axes:
        n, m = vol.shape[axis], out_shape[axis]
        width = [(0, 0)] * 3
        width[axis] = (pad, pad)
        coef = ndimage.spline_filter1d(np.pad(vol, width, mode="edge"), order=3, axis=axis,
                                       mode="mirror", output=np.float32)
        coord = scale[axis] * np.arange(m) + offset[axis] + pad
        base = np.floor(coord).astype(np.int64)
        w = geometry._bspline3_weights(coord - base).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = m
        terms = [np.take(coef, np.clip(base - 1 + k, 0, n + 2 * pad - 1), axis=axis)
                 * w[k].reshape(shape) for k in range(4)]
        vol = terms[0] + terms[1] + terms[2] + terms[3]
    return vol


# ---- measurement ------------------------------------------------------------------------------
def measure(fn, repeats: int):
    """(best seconds, peak bytes above the start, result of the last call)."""
    best, peak, result = float("inf"), 0, None
    for _ in range(repeats):
        result = None
        tracemalloc.start()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return best, peak, result


def run(slices: int, modality: str, repeats: int) -> list[dict]:
    image = phantom(slices, modality)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    params = PreprocessParams(1.5, 3, "float32", 0, False, None)  # no crop: the whole volume
    shape, _, step, offset = geometry.resampled_grid(image.shape[1:], affine, 1.5)
    normed = normalize(image, normalization_for(modality))[0]
    steps = {
        "normalize": (lambda: normalize(image, normalization_for(modality))[0],
                      lambda: normalize_whole(image, modality)),
        "resample": (lambda: geometry.separable_resample(normed[0], step, offset, shape, 3),
                     lambda: resample_whole(normed[0], step, offset, shape)),
        "prepare_arrays": (lambda: prepare_arrays(image, affine, modality, params)[0][0],
                           lambda: resample_whole(normalize_whole(image, modality)[0], step,
                                                  offset, shape)),
    }
    rows = []
    for name, (ours, whole) in steps.items():
        t_h, m_h, r_h = measure(ours, repeats)
        t_w, m_w, r_w = measure(whole, repeats)
        rows.append({"modality": modality, "shape": list(image.shape[1:]), "step": name,
                     "hermes_s": t_h, "whole_s": t_w, "hermes_peak_mib": m_h / 2**20,
                     "whole_peak_mib": m_w / 2**20, "input_mib": image.nbytes / 2**20,
                     "max_abs_diff": float(np.abs(np.asarray(r_h) - np.asarray(r_w)).max())})
        del r_h, r_w
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--modalities", default="CT,T1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="40 slices, one repeat (CI smoke)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    slices, repeats = (40, 1) if args.quick else (args.slices, args.repeats)
    rows = [r for m in args.modalities.split(",") for r in run(slices, m.strip(), repeats)]
    header = ("| modality | step | hermes s | whole-volume s | speed-up | hermes peak MiB | "
              "whole-volume peak MiB | peak ratio | max abs diff |")
    lines = [f"Input 512x512x{slices} float32 ({rows[0]['input_mib']:.0f} MiB), 0.8x0.8x1 mm "
             f"-> 1.5 mm cubic; {platform.machine()}, best of {repeats}; peak = tracemalloc "
             "above the step's start.", "", header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['modality']} | {r['step']} | {r['hermes_s']:.2f} | "
                     f"{r['whole_s']:.2f} | {r['whole_s'] / r['hermes_s']:.2f}x | "
                     f"{r['hermes_peak_mib']:.0f} | {r['whole_peak_mib']:.0f} | "
                     f"{r['hermes_peak_mib'] / r['whole_peak_mib']:.2f} | "
                     f"{r['max_abs_diff']:.1e} |")
    print("\n".join(lines))
    out = Path(args.out) if args.out else HERE / "results" / (
        "preprocess_cpu" + ("_quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "slices": slices}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
