"""Transfer and incremental learning on the synthetic collection (issue 7 evidence).

1. A synthetic collection without shared task names (every task is ``dataset/structure``) is
   split into OLD datasets (default synth_ct, synth_t1, synth_t2) and one NEW dataset
   (default synth_pet), preprocessed into two caches (6 mm, so a 32^3 crop sees most of the body).
2. A tiny model is pretrained on the old caches (``--pretrain-steps``).
3. Transfer: the new dataset's validation Dice after ``priors`` and ``full`` fine-tuning
   (``--finetune-steps`` each) versus a fresh model trained on the new dataset alone with the
   same budget (steps, batch, crop, learning rate).
4. Incremental: every old task's validation Dice before and after ``incremental`` fine-tuning
   (distillation; distillation + rehearsal; ``freeze_shared``, where only the new prior rows
   train, at ``--prior-lr-scale`` times the rate, as in the ``priors`` run; ``new_decoder``,
   where the new tasks get their own trainable decoder branch), against the >= 98 % retention
   goal; the old tasks after ``full`` fine-tuning are listed as the forgetting reference.

Writes a Markdown table and JSON under ``benchmarks/results/`` and prints the table.
Runs on CPU: the defaults (800 pretraining steps, 150 per fine-tuning, 9 cases per dataset of
which 3 validate) took 16 minutes on a 2-core machine (distillation doubles a step's cost). On a
machine shared with other jobs use one thread (OpenMP spin-waiting on oversubscribed cores was
10x slower here)::

    python benchmarks/transfer_incremental.py --threads 2 --tag cpu_new_decoder
    # --arms incremental-new-decoder,fresh  runs a subset of the fine-tunings
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import hermes.data as hd
import hermes.models as hm
from hermes.data.synthetic import generate_collection
from hermes.training import TrainConfig, Trainer
from hermes.training.evaluate import evaluate
from hermes.training.finetune import finetune

RESULTS = Path(__file__).resolve().parent / "results"


def make_cache(root: Path, datasets: tuple[str, ...], name: str, seed: int, cases: int,
               spacing: float):
    y = generate_collection(root / f"src_{name}", seed=seed, cases_per_dataset=cases,
                            datasets=datasets, size=(24, 32))
    cfg = yaml.safe_load(y.read_text())
    cfg.pop("shared_tasks", None)  # dataset-prefixed task names: new tasks need new priors
    cfg["name"] = name
    y.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return hd.preprocess(hd.load_collection(y), root / f"cache_{name}", workers=1,
                         progress=False, image_order=1, spacing=spacing)


def dice_table(model, pc, roi) -> dict[str, float]:
    """Mean validation Dice per task."""
    res = evaluate(model, pc, split="val", roi=roi, progress=False)
    return {s["task"]: s["dice"] for s in res.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="synth_ct,synth_t1,synth_t2")
    ap.add_argument("--new", default="synth_pet")
    ap.add_argument("--cases", type=int, default=9, help="cases per dataset (1/3 validation)")
    ap.add_argument("--spacing", type=float, default=6.0)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3, help="pretraining and fresh-model lr")
    ap.add_argument("--finetune-lr", type=float, default=5e-4, help="lr of every fine-tuning")
    ap.add_argument("--distill", type=float, default=10.0,
                    help="distillation weight of the incremental runs (finetune's default: 1)")
    ap.add_argument("--prior-lr-scale", type=float, default=20.0,
                    help="prior-table lr multiplier of the priors, frozen and new-decoder runs")
    ap.add_argument("--arms", default="priors,full,incremental,incremental+rehearsal,"
                    "incremental-frozen,incremental-new-decoder,fresh",
                    help="comma-separated fine-tuning runs to make")
    ap.add_argument("--ema", type=float, default=0.9, help="EMA decay (short runs: small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 cases, 4 pre-training and 2 fine-tuning steps")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.pretrain_steps, args.finetune_steps = 3, 4, 2
        args.tag += "_quick"
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hermes_ti_"))
    work.mkdir(parents=True, exist_ok=True)
    crop = (args.crop,) * 3
    common = dict(crop_size=crop, batch_size=args.batch_size, workers=0, lr=args.lr,
                  ema_decay=args.ema, checkpoint_every=10**6, progress=False, tensorboard=False,
                  seed=args.seed, device="cpu")
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        old = make_cache(work, tuple(args.old.split(",")), "old", args.seed, args.cases,
                         args.spacing)
        new = make_cache(work, tuple(args.new.split(",")), "new", args.seed + 1, args.cases,
                         args.spacing)
        timings["data"] = time.perf_counter() - t0

        def fresh(name: str) -> Path:  # a run folder of an earlier benchmark run is replaced
            shutil.rmtree(work / name, ignore_errors=True)
            return work / name

        def run(name, fn):
            t = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - t
            print(f"{name}: {timings[name]:.0f} s", flush=True)
            return out

        base_path = run("pretrain", lambda: Trainer(TrainConfig(
            cache_dir=str(old.cache_dir), out_dir=str(fresh("pretrain")), preset="tiny",
            steps=args.pretrain_steps, **common)).run())
        base = hm.load(base_path)
        old_before = run("eval_old_before", lambda: dice_table(base, old, crop))

        ft = {k: v for k, v in common.items()}
        ft["steps"] = args.finetune_steps
        ft["lr"] = args.finetune_lr if args.finetune_lr is not None else args.lr
        scale = args.prior_lr_scale
        arms = {  # name -> finetune() options; "fresh" trains a new model
            "priors": {"mode": "priors", "prior_lr_scale": scale},
            "full": {"mode": "full"},
            "incremental": {"mode": "incremental", "distill": args.distill},
            "incremental+rehearsal": {"mode": "incremental", "rehearsal": old,
                                      "rehearsal_fraction": 0.5, "distill": args.distill},
            "incremental-frozen": {"mode": "incremental", "freeze_shared": True,
                                   "prior_lr_scale": scale},
            "incremental-new-decoder": {"mode": "incremental", "new_decoder": True,
                                        "prior_lr_scale": scale},
        }
        chosen = args.arms.split(",")
        unknown = sorted(set(chosen) - set(arms) - {"fresh"})
        if unknown:
            raise SystemExit(f"unknown arms {unknown}; choose from {list(arms) + ['fresh']}")
        models = {}
        for i, name in enumerate(a for a in arms if a in chosen):
            models[name] = run(f"finetune_{name}", lambda n=name, i=i: finetune(
                base, new, fresh(f"ft_{i}"), **arms[n], **ft).model)
        if "fresh" in chosen:
            fresh_path = run("fresh", lambda: Trainer(TrainConfig(
                cache_dir=str(new.cache_dir), out_dir=str(fresh("fresh")), preset="tiny",
                steps=args.finetune_steps, **common)).run())
            models["fresh"] = hm.load(fresh_path)

        new_dice = {k: run(f"eval_new_{k}", lambda m=m: dice_table(m, new, crop))
                    for k, m in models.items()}
        old_after = {k: run(f"eval_old_{k}", lambda m=models[k]: dice_table(m, old, crop))
                     for k in models if k.startswith("incremental") or k == "full"}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    new_tasks = list(next(iter(new_dice.values())))
    mean = {k: float(np.mean([v[t] for t in new_tasks])) for k, v in new_dice.items()}
    retention: dict[str, dict[str, float | None]] = {}  # None: the old model scored 0
    for k, after in old_after.items():
        retention[k] = {t: (after[t] / old_before[t] if old_before[t] > 0 else None)
                        for t in old_before}
    result = {
        "benchmark": "transfer_incremental",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "args": vars(args),
        "old_datasets": args.old.split(","),
        "new_dataset": args.new,
        "transfer": {"new_task_dice": new_dice, "mean_new_dice": mean},
        "incremental": {"old_dice_before": old_before, "old_dice_after": old_after,
                        "retention": retention,
                        "goal": ">= 0.98 of each old task's Dice"},
        "seconds": timings,
        "total_seconds": time.perf_counter() - t_start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"transfer_incremental_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))

    lines = [f"# Transfer and incremental learning ({result['device']})", "",
             f"Old datasets: {args.old}; new: {args.new}; tiny preset, {args.crop}^3 crops, "
             f"batch {args.batch_size}, lr {args.lr} (fine-tuning {ft['lr']}), EMA {args.ema}, "
             f"distillation weight {args.distill if args.distill is not None else 1.0}; "
             f"pretraining {args.pretrain_steps} steps, every fine-tuning / fresh run "
             f"{args.finetune_steps} steps. Validation Dice at the original geometry "
             f"({len(old.split('val'))} old / {len(new.split('val'))} new cases).", "",
             "## Transfer: new dataset's tasks", "",
             "| task | " + " | ".join(new_dice) + " |",
             "|---|" + "---:|" * len(new_dice)]
    for t in new_tasks:
        lines.append(f"| {t} | " + " | ".join(f"{new_dice[k][t]:.3f}" for k in new_dice) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean[k]:.3f}**" for k in new_dice) + " |")
    lines += ["", "## Incremental: old tasks before and after (retention = after / before)", "",
              "| task | before | " + " | ".join(f"{k} (ret.)" for k in old_after) + " |",
              "|---|---:|" + "---:|" * len(old_after)]
    for t in old_before:
        cells = [f"{old_after[k][t]:.3f} ("
                 + (f"{retention[k][t]:.1%}" if retention[k][t] is not None else "n/a") + ")"
                 for k in old_after]
        lines.append(f"| {t} | {old_before[t]:.3f} | " + " | ".join(cells) + " |")
    kept = {k: sum(1 for r in v.values() if r is not None and r >= 0.98) for k, v in
            retention.items()}
    scored = sum(1 for t in old_before if old_before[t] > 0)
    result["incremental"]["tasks_kept_98"] = kept
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines += ["", f"Old tasks keeping >= 98 % of their Dice (of the {scored} the old model "
              "segments at all; n/a: old Dice 0): "
              + ", ".join(f"{k}: {v}/{scored}" for k, v in kept.items()), "",
              f"Total {result['total_seconds'] / 60:.1f} min."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
