"""Does data loading keep up with training? Loader throughput versus training step time.

For a synthetic collection (preprocessed cache), measures in one run:
  * loader: batches/s of the training DataLoader (random crops, foreground oversampling,
    MONAI augmentation) with 0, 1 and 2 worker processes;
  * step: seconds per optimiser step of the model (tiny preset on CPU; base on CUDA when
    available) on pre-loaded batches;
and reports loader batches/s x step seconds (>= 1 means the loader keeps up).
Prints a table and writes JSON.

    python benchmarks/bench_training_data.py [--crop 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import hermes.data as hd
from hermes.data.synthetic import generate_collection
from hermes.training import TrainConfig
from hermes.training.sampling import PatchDataset, StepSampler, collate_partial
from hermes.training.trainer import Trainer


def loader_rate(pc, crop, workers, batches, batch_size=2) -> float:
    ds = PatchDataset(pc, (crop,) * 3, seed=0)
    dl = DataLoader(ds, batch_size=batch_size, sampler=StepSampler(0, batches + 2, batch_size),
                    num_workers=workers, collate_fn=collate_partial,
                    prefetch_factor=4 if workers else None)
    it = iter(dl)
    next(it)
    next(it)  # start-up (worker spawn, first mmap) excluded
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t0)


def step_seconds(cache, out, crop, preset, device, steps) -> float:
    cfg = TrainConfig(cache_dir=str(cache), out_dir=str(out), preset=preset,
                      crop_size=(crop,) * 3, batch_size=2, steps=steps + 1, workers=0,
                      progress=False, tensorboard=False, device=device)
    tr = Trainer(cfg)
    ds = PatchDataset(tr.collection, (crop,) * 3, seed=0)
    batches = [collate_partial([ds[2 * i], ds[2 * i + 1]]) for i in range(steps + 1)]
    tr.train_step(batches[0])  # warm-up
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches[1:]:
        tr.train_step(b)
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--work", default="benchmarks/results/training_data")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.crop, args.batches, args.steps = 32, 4, 1
    work = Path(args.work)
    y = generate_collection(work / "src", seed=1, cases_per_dataset=2, size=(48, 64))
    pc = hd.preprocess(hd.load_collection(y), work / "cache", workers=2, progress=False,
                       image_order=1)
    rates = {w: loader_rate(pc, args.crop, w, args.batches) for w in (0, 1, 2)}
    cuda = torch.cuda.is_available()
    preset, device = ("base", "cuda") if cuda else ("tiny", "cpu")
    step = step_seconds(pc.cache_dir, work / "run", args.crop, preset, device, args.steps)
    print(f"crop {args.crop}^3, batch 2; model step: {preset} on {device}: {step:.3f} s/step")
    print(f"{'workers':>7} {'batches/s':>10} {'keeps up (rate x step)':>24}")
    for w, r in rates.items():
        print(f"{w:>7} {r:10.2f} {r * step:24.2f}")
    out = {"machine": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name() if cuda else "cpu",
           "crop": args.crop, "preset": preset, "step_seconds": step,
           "loader_batches_per_second": rates}
    (work / "bench_training_data.json").write_text(json.dumps(out, indent=1))
    print(f"JSON: {work / 'bench_training_data.json'}")


if __name__ == "__main__":
    main()
