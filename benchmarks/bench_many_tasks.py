"""``hermes.segment`` with many tasks on a large CT: memory of the masks' probabilities.

A universal model segments tens of structures at once. The masks are thresholded after mapping
each task's probabilities back to the original grid; they need the probabilities near each
structure only (``hermes.inference.sparse_probs``), where the whole ``T x X x Y x Z`` float32
volume on the model grid was kept before. This script runs both ways side by side, each in its
own process, on the same input, and checks that their label maps and masks are identical.

Input: a synthetic CT of ``512 x 512 x --slices`` at 0.75 x 0.75 x 1.5 mm (a body and ``--tasks``
- 1 organ-sized ellipsoids of distinct intensities, 12-45 mm semi-axes), segmented by an oracle
model whose logits are voxel-wise functions of the intensity (no network: the timings are those
of the pipeline around it: preprocessing, stitching, write-back). Peak memory is the process'
resident-set high-water mark (``VmHWM``) during ``hermes.segment``.

Usage: ``python benchmarks/bench_many_tasks.py [--quick] [--tasks 41] [--slices 400]``; writes
``benchmarks/results/many_tasks_cpu[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from proc_memory import reset_peak_rss, status_bytes

HERE = Path(__file__).resolve().parent
SPACING = (0.75, 0.75, 1.5)


def organs(n: int, seed: int = 0) -> list[tuple[tuple[float, ...], tuple[float, ...], float]]:
    """``(centre mm, semi-axes mm, intensity)`` of the body and ``n - 1`` organs."""
    g = np.random.default_rng(seed)
    out = [((0.0, 0.0, 0.0), (170.0, 120.0, 1e4), 40.0)]
    for t in range(n - 1):
        centre = (g.uniform(-120, 120), g.uniform(-80, 80), g.uniform(-250, 250))
        out.append((centre, tuple(g.uniform(12, 45, 3)), 200.0 + 40.0 * t))
    return out


def make_ct(path: Path, slices: int, tasks: int) -> None:
    from hermes.data.io import save_image

    shape = (512, 512, slices)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s
                            for n, s in zip(shape, SPACING, strict=True)],
                          indexing="ij", sparse=True)
    vol = np.full(shape, -1000, np.int16)
    for (cx, cy, cz), (ax, ay, az), value in organs(tasks):
        inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1
        vol[np.broadcast_to(inside, shape)] = value
    save_image(path, vol, np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0]))


def oracle(tasks: int):
    """A Hermes model whose logits are voxel-wise: task t is 'intensity near organ t's'."""
    import torch

    import hermes.models as hm
    from hermes.models.hermes_resunet import HermesOutput, HermesResUNet

    values = [v for *_, v in organs(tasks)]

    class Oracle(HermesResUNet):
        def forward(self, x, tasks=None, modality=None, **kwargs):  # type: ignore[override]
            v = x[:, 0]
            seg = torch.stack([(15.0 - (v - values[self.vocab.tasks.index(t)]).abs()) / 3.0
                               for t in tasks], 1)
            return HermesOutput(seg, torch.zeros(x.shape[0], 1), None, None)

    names = [f"organ_{t:02d}" for t in range(tasks)]
    net = hm.build("tiny", tasks=names, modalities=["CT"],
                   groups={"all": {"tasks": names, "modality": "CT"}})
    net.__class__ = Oracle
    net.hermes_metadata = {"preprocess": {"spacing": [1.5, 1.5, 1.5],
                                          "normalization": {"CT": {"kind": "none"}}},
                           "train_config": {"crop_size": [96, 96, 96]}}
    return net.eval()


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import hermes
    import hermes.inference.segment as seg

    seg.SPARSE_MASKS = cfg["sparse"]
    net = oracle(cfg["tasks"])
    rss0 = status_bytes("VmRSS") or 0
    exact = reset_peak_rss()
    timings: dict = {}
    res = hermes.segment(cfg["image"], modality="CT", model=net, device="cpu",
                         timings=timings)
    peak = status_bytes("VmHWM") or 0
    np.save(cfg["labels_to"], res.labels)
    np.save(cfg["counts_to"], np.array([res.masks.count(t) for t in range(len(res.task_names))]))
    return {"timings": timings, "peak_rss_bytes": peak,
            "peak_above_start_bytes": peak - rss0 if exact else None,
            "model_grid": res.settings["model_grid_shape"], "image_shape": list(res.shape),
            "windows": res.settings["windows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tasks", type=int, default=41, help="tasks, the body included")
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--quick", action="store_true", help="21 tasks, 120 slices")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.quick:
        args.tasks, args.slices = 21, 120
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ct.nii.gz"
        t0 = time.perf_counter()
        make_ct(image, args.slices, args.tasks)
        print(f"input: 512x512x{args.slices} CT, {args.tasks} tasks "
              f"({time.perf_counter() - t0:.1f} s to write)", flush=True)
        rows = []
        for sparse in (False, True):
            name = "sparse (near structures)" if sparse else "whole volumes (before)"
            cfg = {"image": str(image), "tasks": args.tasks, "threads": args.threads,
                   "sparse": sparse, "labels_to": str(Path(tmp) / f"labels_{sparse}.npy"),
                   "counts_to": str(Path(tmp) / f"counts_{sparse}.npy")}
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["mode"] = name
            rows.append(r)
            print(f"  {name}: done", flush=True)
        same_labels = bool(np.array_equal(np.load(Path(tmp) / "labels_False.npy"),
                                          np.load(Path(tmp) / "labels_True.npy")))
        same_counts = bool(np.array_equal(np.load(Path(tmp) / "counts_False.npy"),
                                          np.load(Path(tmp) / "counts_True.npy")))
    grid = rows[0]["model_grid"]
    dense_gib = args.tasks * int(np.prod(grid)) * 4 / 2**30
    lines = [f"`hermes.segment`, {args.tasks} tasks, 512x512x{args.slices} CT "
             f"(0.75x0.75x1.5 mm), model grid {'x'.join(map(str, grid))} at 1.5 mm "
             f"(T x grid float32 = {dense_gib:.2f} GiB), {rows[0]['windows']} windows, "
             f"{args.threads} threads; identical label maps: {same_labels}, identical mask "
             f"voxel counts: {same_counts}", "",
             "| probabilities kept | preprocess s | inference s | write-back s | total s "
             "| peak RSS GiB | peak above start GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings"]
        above = r["peak_above_start_bytes"]
        lines.append(f"| {r['mode']} | {t['preprocess']:.2f} | {t['inference']:.2f} | "
                     f"{t['writeback']:.2f} | {t['total']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{'-' if above is None else f'{above / 2**30:.2f}'} |")
    ratio = rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
    lines += ["", f"peak RSS sparse / whole volumes: {ratio:.2f}"]
    table = "\n".join(lines)
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "many_tasks_cpu" + ("_quick" if args.quick else "")
    (out_dir / f"{stem}.md").write_text(table + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"machine": platform.platform(), "processor": platform.processor(),
         "tasks": args.tasks, "slices": args.slices, "threads": args.threads,
         "identical_labels": same_labels, "identical_mask_counts": same_counts,
         "dense_probabilities_gib": dense_gib, "rows": rows, "peak_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
