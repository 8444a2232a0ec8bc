"""Evidence for universal training: one joint Hermes model versus one model per dataset.

On a synthetic multi-modality collection (hermes.data.synthetic), the same budget of optimiser
steps is spent either on ONE model trained on all datasets jointly, or split evenly across one
model per dataset (each sees only its own dataset). Per-task Dice on each dataset's validation
cases, at the original image geometry, side by side. Prints a table, writes JSON.

    python benchmarks/joint_vs_separate.py [--steps 1600] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

import hermes.data as hd
import hermes.models as hm
from hermes.data.synthetic import generate_collection
from hermes.training import TrainConfig, train
from hermes.training.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1600, help="total optimiser steps per arm")
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--spacing", type=float, default=4.0,
                    help="preprocessing spacing in mm (the synthetic images have 4-6 mm voxels)")
    ap.add_argument("--cases", type=int, default=10, help="cases per dataset")
    ap.add_argument("--work", default="benchmarks/results/joint_vs_separate")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.crop, args.cases = 8, 32, 2
    work = Path(args.work)
    yaml_path = generate_collection(work / "src", seed=7, cases_per_dataset=args.cases,
                                    size=(40, 56))
    pc = hd.preprocess(hd.load_collection(yaml_path), work / "cache", spacing=args.spacing,
                       workers=2, progress=False, image_order=1)
    datasets = list(pc.datasets)
    common = dict(cache_dir=str(pc.cache_dir), crop_size=(args.crop,) * 3, batch_size=2,
                  workers=1, checkpoint_every=10**9, progress=False, tensorboard=False, seed=0)
    timings = {}

    def fresh(name: str) -> str:  # a run folder of an earlier benchmark run is replaced
        shutil.rmtree(work / name, ignore_errors=True)
        return str(work / name)

    t0 = time.perf_counter()
    joint_path = train(TrainConfig(out_dir=fresh("joint"), steps=args.steps, **common))
    timings["joint"] = time.perf_counter() - t0
    per_steps = max(1, args.steps // len(datasets))
    separate_paths = {}
    for ds in datasets:
        t0 = time.perf_counter()
        separate_paths[ds] = train(TrainConfig(out_dir=fresh(f"separate_{ds}"),
                                               steps=per_steps, datasets=[ds], **common))
        timings[f"separate_{ds}"] = time.perf_counter() - t0

    roi = (args.crop,) * 3
    joint_eval = evaluate(hm.load(joint_path), pc, split="val", roi=roi, progress=False)
    joint_rows = joint_eval.summary()
    sep = {}
    for ds, path in separate_paths.items():
        res = evaluate(hm.load(path), pc, split="val", roi=roi, progress=False, datasets=[ds])
        sep.update({(r["dataset"], r["task"]): r for r in res.summary()})
    # structure size (mean ground-truth voxels at the original geometry): small = hard
    size: dict[tuple[str, str], list[int]] = {}
    for r in joint_eval.rows:
        size.setdefault((r["dataset"], r["task"]), []).append(r["gt_voxels"])
    table = []
    for r in joint_rows:
        key = (r["dataset"], r["task"])
        s = sep[key]
        table.append({"dataset": r["dataset"], "task": r["task"], "cases": r["cases"],
                      "gt_voxels": float(sum(size[key]) / len(size[key])),
                      "dice_joint": r["dice"], "dice_separate": s["dice"],
                      "nsd_joint": r["nsd"], "nsd_separate": s["nsd"]})
    print(f"\nsame budget: {args.steps} steps joint vs {per_steps} steps x {len(datasets)} "
          f"per-dataset models (batch 2, crop {args.crop}^3 at {args.spacing} mm, tiny preset); "
          f"validation cases of each dataset")
    print(f"{'dataset':<10} {'task':<22} {'n':>2} {'voxels':>7} {'joint':>6} {'separate':>8} "
          f"{'diff':>6} {'NSD j':>6} {'NSD s':>6}")
    for t in sorted(table, key=lambda t: (t["dataset"], -t["gt_voxels"])):
        print(f"{t['dataset']:<10} {t['task']:<22} {t['cases']:>2} {t['gt_voxels']:7.0f} "
              f"{t['dice_joint']:6.3f} {t['dice_separate']:8.3f} "
              f"{t['dice_joint'] - t['dice_separate']:+6.3f} {t['nsd_joint']:6.3f} "
              f"{t['nsd_separate']:6.3f}")
    n = len(table)
    mj = sum(t["dice_joint"] for t in table) / n
    ms = sum(t["dice_separate"] for t in table) / n
    wins = sum(t["dice_joint"] > t["dice_separate"] for t in table)
    print(f"mean Dice: joint {mj:.3f}, separate {ms:.3f}; joint better on {wins}/{n} tasks")
    by_size = sorted(table, key=lambda t: t["gt_voxels"])
    half = n // 2
    for label, part in (("smaller half", by_size[:half]), ("larger half", by_size[half:])):
        gain = sum(t["dice_joint"] - t["dice_separate"] for t in part) / max(1, len(part))
        print(f"  {label} of structures: mean Dice gain of joint {gain:+.3f}")
    out = {"machine": platform.processor() or platform.machine(), "threads":
           torch.get_num_threads(), "steps": args.steps, "per_dataset_steps": per_steps,
           "crop": args.crop, "spacing_mm": args.spacing, "cases_per_dataset": args.cases,
           "rows": table, "seconds": timings}
    (work / "joint_vs_separate.json").write_text(json.dumps(out, indent=1))
    print(f"JSON: {work / 'joint_vs_separate.json'}")


if __name__ == "__main__":
    main()
