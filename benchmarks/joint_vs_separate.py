"""Evidence for universal training: one joint Hermes model versus one model per dataset.

On a synthetic multi-modality collection (hermes.data.synthetic), the same budget of optimiser
steps is spent either on ONE model trained on all datasets jointly, or split evenly across one
model per dataset (each sees only its own dataset). Per-task Dice on each dataset's validation
cases, at the original image geometry, side by side. Prints a table, writes JSON.

    python benchmarks/joint_vs_separate.py [--steps 600] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
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
    ap.add_argument("--steps", type=int, default=600, help="total optimiser steps per arm")
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--cases", type=int, default=4, help="cases per dataset")
    ap.add_argument("--work", default="benchmarks/results/joint_vs_separate")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.crop, args.cases = 8, 32, 2
    work = Path(args.work)
    yaml_path = generate_collection(work / "src", seed=7, cases_per_dataset=args.cases,
                                    size=(40, 56))
    pc = hd.preprocess(hd.load_collection(yaml_path), work / "cache", spacing=2.0, workers=2,
                       progress=False, image_order=1)
    datasets = list(pc.datasets)
    common = dict(cache_dir=str(pc.cache_dir), crop_size=(args.crop,) * 3, batch_size=2,
                  workers=1, checkpoint_every=10**9, progress=False, tensorboard=False, seed=0)
    timings = {}
    t0 = time.perf_counter()
    joint_path = train(TrainConfig(out_dir=str(work / "joint"), steps=args.steps, **common))
    timings["joint"] = time.perf_counter() - t0
    per_steps = max(1, args.steps // len(datasets))
    separate_paths = {}
    for ds in datasets:
        t0 = time.perf_counter()
        separate_paths[ds] = train(TrainConfig(out_dir=str(work / f"separate_{ds}"),
                                               steps=per_steps, datasets=[ds], **common))
        timings[f"separate_{ds}"] = time.perf_counter() - t0

    roi = (args.crop,) * 3
    joint_rows = evaluate(hm.load(joint_path), pc, split="val", roi=roi, progress=False).summary()
    sep_rows = []
    for ds, path in separate_paths.items():
        model = hm.load(path)
        sub = [r for r in evaluate(model, pc, split="val", roi=roi, progress=False).summary()
               if r["dataset"] == ds]
        sep_rows.extend(sub)
    sep = {(r["dataset"], r["task"]): r for r in sep_rows}
    table = []
    for r in joint_rows:
        s = sep.get((r["dataset"], r["task"]))
        table.append({"dataset": r["dataset"], "task": r["task"], "cases": r["cases"],
                      "dice_joint": r["dice"], "dice_separate": s["dice"] if s else None})
    print(f"\nsame budget: {args.steps} steps joint vs {per_steps} steps x {len(datasets)} "
          f"per-dataset models (batch 2, crop {args.crop}^3, tiny preset, CPU)")
    print(f"{'dataset':<12} {'task':<22} {'n':>2} {'joint':>7} {'separate':>9} {'diff':>7}")
    for t in table:
        sd = t["dice_separate"]
        diff = "" if sd is None else f"{t['dice_joint'] - sd:+.3f}"
        print(f"{t['dataset']:<12} {t['task']:<22} {t['cases']:>2} {t['dice_joint']:7.3f} "
              f"{sd if sd is None else round(sd, 3):>9} {diff:>7}")
    mj = sum(t["dice_joint"] for t in table) / len(table)
    ms = [t["dice_separate"] for t in table if t["dice_separate"] is not None]
    print(f"mean Dice: joint {mj:.3f}, separate {sum(ms) / len(ms):.3f}")
    out = {"machine": platform.processor() or platform.machine(), "threads":
           torch.get_num_threads(), "steps": args.steps, "per_dataset_steps": per_steps,
           "crop": args.crop, "rows": table, "seconds": timings}
    (work / "joint_vs_separate.json").write_text(json.dumps(out, indent=1))
    print(f"JSON: {work / 'joint_vs_separate.json'}")


if __name__ == "__main__":
    main()
