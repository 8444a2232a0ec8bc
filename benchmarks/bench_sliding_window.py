"""Sliding-window inference: Hermes' native aggregation against MONAI.

For each volume, channel count, blending mode and sw_batch_size this runs, in one process and
interleaved: the predictor alone over the same windows (MONAI's window extraction and batching),
MONAI's ``sliding_window_inference`` (float logits; and a label map computed from them, either
the usual way through a float32 sigmoid of the whole volume or "lean", by a max over the
logits), Hermes as a drop-in (float logits) and Hermes streaming straight to a label map. It
reports wall time (best round), stitching time (total minus the predictor-alone time), the same
two in process CPU time (steadier on a shared machine: time spent waiting for a core is not
counted), peak memory above the starting point, and the stitching time over the bandwidth floor
(reading and writing the float32 accumulators once per window voxel,
``windows * C * roi^3 * 4 B * 2``, at the measured copy bandwidth; the JSON also has the floor
at the issue's 48 GB/s). Label rows compare with MONAI + the lean labelling; "peak vs" uses the
usual labelling, "vs lean" the lean one. The CT-sized volume (``--ct-shape``, 72 channels) is
run once per method and without MONAI's float-probability labelling, which would not fit.

The trivial predictor writes into one reused buffer per batch size, as a fast predictor with its
own memory pool would; ``--fresh-outputs`` makes it return fresh memory on every call, whose page
faults (~1.3 GB/s here) then dominate the predictor time and blur the stitching figures.

CPU peak memory: the high-water mark of the resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; a 1 ms RSS sampler when that is not permitted) minus the resident set
before the run, plus Hermes' cached accumulator buffers held before the run (they are part of
its footprint). CUDA: ``torch.cuda.max_memory_allocated`` above the starting allocation.

Usage: ``python benchmarks/bench_sliding_window.py [--quick] [--device cuda]``; writes
``benchmarks/results/sliding_window_<device>.json`` (``..._quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from proc_memory import reset_peak_rss, rss_bytes, status_bytes

from hermes.inference import (
    best_stream_axis,
    clear_workspace,
    sliding_window_inference,
    window_starts,
)
from hermes.inference._workspace import cached_bytes
from hermes.ops import capabilities

#: The issue's measured bandwidth of the reference 2-core machine (bytes/s), for a second floor.
NOMINAL_BANDWIDTH = 48e9


# ---- memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory above the start of a ``with`` block (bytes), CPU or CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = rss_bytes()
        self._use_hwm = reset_peak_rss()
        self._stop = threading.Event()
        self._max = self.base
        if not self._use_hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        if self._use_hwm:
            self.peak = (status_bytes("VmHWM") or self._max) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes()) - self.base


# ---- helpers -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, mib: int = 512) -> float:
    """Copy bandwidth (read + write bytes per second) on reused buffers."""
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.zeros(n, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n * 4 / best


def make_predictor(
    channels: int, device: torch.device, reuse_output: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A trivial predictor: ``C`` scaled copies of the single input channel.

    ``reuse_output``: written into one buffer per batch size, as a fast predictor with its own
    memory pool would; otherwise into fresh memory on every call, whose page faults (~1.3 GB/s
    here, against ~10 GB/s for reused memory) then dominate and blur the stitching time.
    """
    scale = torch.linspace(-1.0, 1.0, channels, device=device).view(1, channels, 1, 1, 1)
    buffers: dict[tuple[int, ...], torch.Tensor] = {}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if not reuse_output:
            return x * scale
        shape = (x.shape[0], channels, *x.shape[2:])
        out = buffers.get(shape)
        if out is None:
            out = buffers[shape] = torch.empty(shape, device=device)
        return torch.mul(x, scale, out=out)

    return predictor


def predictor_alone(inputs, roi, bs, predictor, overlap) -> None:
    """The predictor over MONAI's windows and batches, without aggregation."""
    starts = window_starts(inputs.shape[2:], roi, [overlap] * 3)
    for i in range(0, len(starts), bs):
        sl = [
            (slice(0, 1), slice(None), *(slice(s, s + r) for s, r in zip(st, roi, strict=True)))
            for st in starts[i : i + bs]
        ]
        windows = torch.cat([inputs[s] for s in sl]) if len(sl) > 1 else inputs[sl[0]]
        predictor(windows)


def monai_labels(logits: torch.Tensor, threshold: float = 0.5, lean: bool = False) -> torch.Tensor:
    """Label map from MONAI's float result (1 + argmax over tasks where max prob >= threshold).

    ``lean=False``: the usual post-processing (sigmoid to probabilities, then max over tasks,
    as MONAI's ``Activations(sigmoid=True)`` followed by an argmax). ``lean=True``: max over
    the logits and one sigmoid per voxel (no second C x D x H x W tensor).
    """
    if lean:
        best, arg = logits.max(dim=1, keepdim=True)
        best = torch.sigmoid(best)
    else:
        best, arg = torch.sigmoid(logits).max(dim=1, keepdim=True)
    return torch.where(best >= threshold, arg + 1, 0).to(torch.uint8)


def timed(fn: Callable[[], Any], device: torch.device, memory: bool) -> dict[str, Any]:
    """One run: wall and process CPU seconds, and the peak memory when ``memory``."""
    gc.collect()
    held = cached_bytes()  # Hermes buffers held from earlier runs: part of its footprint
    mem = PeakMemory(device) if memory else None
    if mem is not None:
        mem.__enter__()
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if mem is not None:
        mem.__exit__(None, None, None)
    return dict(wall=wall, cpu=cpu, peak=(mem.peak + held) if mem else None, result=result)


def _ratio(ours: float, theirs: float | None) -> float | None:
    """ours / theirs, or None when the reference peak is too small to be meaningful (< 1 MiB)."""
    return None if theirs is None or theirs < 2**20 else ours / theirs


# ---- main ------------------------------------------------------------------------------------
def run_case(
    shape, channels, mode, bs, device, repeats, roi, overlap, bandwidth, large=False,
    reuse_output=True,
) -> list[dict[str, Any]]:
    """Rows of one configuration. ``large``: only the memory comparison at equal outputs
    (predictor, MONAI + lean labels, Hermes streaming labels along axis 0 and the best axis);
    MONAI's float result with a full sigmoid copy would not fit in memory."""
    inputs = torch.randn(1, 1, *shape, device=device)
    predictor = make_predictor(channels, device, reuse_output)
    n_windows = len(window_starts(shape, roi, [overlap] * 3))
    floor = n_windows * channels * roi[0] * roi[1] * roi[2] * 4 * 2 / bandwidth
    kw = dict(overlap=overlap, mode=mode)
    from monai.inferers import sliding_window_inference as monai_swi

    runs = {
        "predictor": lambda: predictor_alone(inputs, roi, bs, predictor, overlap),
        "monai": lambda: monai_swi(inputs, roi, bs, predictor, **kw),
        "monai+labels": lambda: monai_labels(monai_swi(inputs, roi, bs, predictor, **kw)),
        "monai+labels-lean": lambda: monai_labels(
            monai_swi(inputs, roi, bs, predictor, **kw), lean=True
        ),
        "hermes": lambda: sliding_window_inference(inputs, roi, bs, predictor, **kw),
        "hermes-stream-labels": lambda: sliding_window_inference(
            inputs, roi, bs, predictor, output="labels", streaming=True, **kw
        ),
        "hermes-stream-labels-auto": lambda: sliding_window_inference(
            inputs, roi, bs, predictor, output="labels", streaming=True, stream_axis="auto", **kw
        ),
    }
    if best_stream_axis(shape, roi) == 0 or not large:
        del runs["hermes-stream-labels-auto"]
    if large:
        for name in ("monai", "monai+labels"):
            del runs[name]
    # A first run of each measures the peak memory (cold: it includes Hermes' first allocation
    # of its reusable buffers); then timed rounds, interleaved so that a noisy machine affects
    # every method alike. The best round counts (for `large`, the first run is the only one).
    peaks: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    wall = {name: float("inf") for name in runs}
    cpu = {name: float("inf") for name in runs}
    for name, fn in runs.items():
        clear_workspace()  # each method's cold peak includes its own reusable buffers
        r = timed(fn, device, memory=True)
        peaks[name] = r["peak"]
        if large or repeats == 0:
            wall[name], cpu[name] = r["wall"], r["cpu"]
        if "labels" in name:
            outputs[name] = r["result"].cpu()
        del r
    for _ in range(0 if large else repeats):
        for name, fn in runs.items():
            r = timed(fn, device, memory=False)
            wall[name], cpu[name] = min(wall[name], r["wall"]), min(cpu[name], r["cpu"])
            del r
    t_pred, c_pred = wall.pop("predictor"), cpu.pop("predictor")
    # label maps compared with Hermes' (voxels that differ): the float32 sigmoid of the usual
    # post-processing rounds near-equal probabilities to ties (e.g. logits ~0 -> 0.5 for all)
    ours = outputs.get("hermes-stream-labels")
    mismatch = {k: int((v != ours).sum()) for k, v in outputs.items() if ours is not None}
    rows = []
    for name in wall:
        stitch = max(wall[name] - t_pred, 0.0)
        rows.append(
            dict(
                shape=list(shape), channels=channels, mode=mode, sw_batch_size=bs, method=name,
                windows=n_windows, total_ms=1e3 * wall[name], predictor_ms=1e3 * t_pred,
                stitch_ms=1e3 * stitch, total_cpu_ms=1e3 * cpu[name],
                predictor_cpu_ms=1e3 * c_pred, stitch_cpu_ms=1e3 * max(cpu[name] - c_pred, 0.0),
                peak_mib=peaks[name] / 2**20, floor_ms=1e3 * floor,
                stitch_over_floor=stitch / floor, label_voxels_differing=mismatch,
                floor_nominal_ms=1e3 * floor * bandwidth / NOMINAL_BANDWIDTH,
            )
        )  # fmt: skip
    base = "monai" if "monai" in wall else "monai+labels-lean"
    for row in rows:
        # stitching against MONAI's float output; label rows against MONAI + its labelling
        is_label = "labels" in row["method"]
        ref = "monai+labels-lean" if is_label else base
        row["stitch_vs_monai"] = row["stitch_ms"] / max(1e3 * (wall[ref] - t_pred), 1e-9)
        row["stitch_cpu_vs_monai"] = row["stitch_cpu_ms"] / max(1e3 * (cpu[ref] - c_pred), 1e-9)
        std = peaks.get("monai+labels") if is_label else peaks[base]
        row["peak_vs_monai"] = _ratio(peaks[row["method"]], std)
        row["peak_vs_monai_lean"] = _ratio(peaks[row["method"]], peaks[ref])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs after the first (0: report the first)")  # fmt: skip
    parser.add_argument("--channels", type=int, nargs="*", default=None)
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(96, 512, 512),
                        help="the CT-sized volume (D H W)")  # fmt: skip
    parser.add_argument("--skip-ct", action="store_true", help="only the 160x192x192 volume")
    parser.add_argument("--only-ct", action="store_true", help="only the CT-sized volume")
    parser.add_argument("--modes", nargs="*", default=["gaussian", "constant"])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth in GB/s (default: measured copy)")  # fmt: skip
    parser.add_argument("--fresh-outputs", action="store_true",
                        help="the predictor returns fresh memory on every call")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.quick:
        shapes, roi, channels, repeats = [(48, 64, 56)], (32, 32, 32), [4], 1
        cases = [(s, c, "gaussian", 1) for s in shapes for c in channels]
    else:
        shapes = [(160, 192, 192)] + ([] if args.skip_ct else [tuple(args.ct_shape)])
        roi, repeats = (96, 96, 96), args.repeats
        channels = args.channels or [16, 72]
        cases = []
        for s in shapes:
            for c in channels:
                for m in args.modes:
                    for b in args.batch_sizes:
                        if s != shapes[0] and (m != "gaussian" or b != 1 or c != max(channels)):
                            continue  # the CT-sized volume: one configuration (memory target)
                        if args.only_ct and s == shapes[0]:
                            continue
                        cases.append((s, c, m, b))
    bandwidth = (args.bandwidth * 1e9) if args.bandwidth else measure_bandwidth(device)
    caps = capabilities()
    header = dict(
        device=str(torch.cuda.get_device_name(0)) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        bandwidth_gb_s=bandwidth / 1e9, torch=torch.__version__,
        openmp_threads=caps.get("openmp_threads"), roi=list(roi), overlap=0.5,
        predictor_output="fresh" if args.fresh_outputs else "reused",
    )  # fmt: skip
    print(json.dumps(header))
    cols = ("shape", "C", "mode", "bs", "method", "total ms", "pred ms", "stitch ms",
            "vs MONAI", "x floor", "cpu stitch", "vs MONAI", "peak MiB", "peak vs",
            "vs lean")  # fmt: skip
    fmt = ("{:>12} {:>3} {:>8} {:>2} {:>25} {:>8} {:>7} {:>9} {:>8} {:>7} {:>10} {:>8} {:>8} "
           "{:>7} {:>7}")  # fmt: skip
    print(fmt.format(*cols))
    rows = []
    for shape, c, mode, bs in cases:
        clear_workspace()
        large = not args.quick and shape == tuple(args.ct_shape)
        for row in run_case(shape, c, mode, bs, device, repeats, roi, 0.5, bandwidth, large,
                            not args.fresh_outputs):
            rows.append(row)
            print(fmt.format(
                "x".join(map(str, shape)), c, mode, bs, row["method"], f"{row['total_ms']:.0f}",
                f"{row['predictor_ms']:.0f}", f"{row['stitch_ms']:.0f}",
                f"{row['stitch_vs_monai']:.2f}", f"{row['stitch_over_floor']:.1f}",
                f"{row['stitch_cpu_ms']:.0f}", f"{row['stitch_cpu_vs_monai']:.2f}",
                f"{row['peak_mib']:.0f}",
                "-" if row["peak_vs_monai"] is None else f"{row['peak_vs_monai']:.2f}",
                "-" if row["peak_vs_monai_lean"] is None else f"{row['peak_vs_monai_lean']:.2f}",
            ), flush=True)  # fmt: skip
        print(f"  floor {rows[-1]['floor_ms']:.0f} ms at the measured bandwidth "
              f"({rows[-1]['floor_nominal_ms']:.0f} ms at 48 GB/s); label voxels differing from "
              "Hermes': "
              f"{rows[-1]['label_voxels_differing']}", flush=True)  # fmt: skip
    out = args.out or Path(__file__).parent / "results" / f"sliding_window_{device.type}.json"
    if args.quick and args.out is None:
        out = out.with_name(out.stem + "_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
