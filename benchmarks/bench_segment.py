"""End-to-end ``hermes.segment`` on CPU: time per step and peak memory.

Two inputs: a 1 mm head T1 (the nilearn MNI152 ICBM 2009a template at 1 mm when nilearn is
installed, else the bundled 2 mm example upsampled to 1 mm) and a chest-CT-sized volume
(512 x 512 x ``--ct-slices`` at 0.75 x 0.75 x 5 mm, a synthetic HU phantom: body, lungs, heart,
spine). Modes: standard (overlap 0.5, cubic resampling, one window per forward: the default),
``--fast`` (overlap 0.25, linear resampling), standard with two windows per forward, and
standard with PyTorch's own batch-1 convolution path and unfused instance norm + ReLU
(``HERMES_ONEDNN_CONV=0 HERMES_FUSED_NORM=0``: the backbone as it was before).

Steps (seconds): ``load`` (model + image read), ``preprocess`` (reorient, crop, normalise,
resample), ``inference`` (sliding window), ``writeback`` (probabilities back to the original
grid, masks, label map, statistics) and ``save`` (NIfTI, JSON, CSV, preview PNG). Every
configuration runs in its own process after one warm-up forward (the first forward of a process
pays one-off lazy imports, reported as ``first_forward``); peak memory is the process'
resident-set high-water mark (``VmHWM``), also given above the resident set before the run.

``--device cuda``: the network on the GPU (preprocessing and write-back stay on the CPU); the
modes are then standard (two windows per forward there), one window per forward and standard
with the reference (unfused) prior attention (``HERMES_PRIOR_IMPL=reference``), whose label map
is compared voxel by voxel with the standard one's (the fused op's GPU formulations against the
reference on a whole volume); peak memory adds ``torch.cuda.max_memory_allocated``.

Model: ``--model PATH`` or the embedded default model; when that is absent, a randomly
initialised ``--preset`` (default ``tiny``) with a CT and a T1 group stands in (timings do not
depend on the weights).

Usage: ``python benchmarks/bench_segment.py [--quick] [--threads N] [--device cuda]``; writes
``benchmarks/results/segment_<device>[_quick].json`` and ``.md``.
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


# ---- inputs ----------------------------------------------------------------------------------
def make_head_t1(path: Path) -> str:
    from hermes.data.io import load_image, save_image

    try:
        import nibabel as nib
        from nilearn.datasets import struct

        img = nib.load(struct.MNI152_FILE_PATH)
        save_image(path, np.asarray(img.dataobj).astype(np.int16), img.affine)
        return "nilearn MNI152 2009a T1, 1 mm, 197x233x189"
    except ImportError:
        from scipy import ndimage

        from hermes.inference.commands import example_path

        arr, aff = load_image(example_path(), dtype=np.float32)
        up = ndimage.zoom(arr, 2, order=1)
        aff = aff @ np.diag([0.5, 0.5, 0.5, 1.0])
        save_image(path, up.astype(np.int16), aff)
        return f"bundled example upsampled to 1 mm, {up.shape}"


def make_chest_ct(path: Path, slices: int) -> str:
    from hermes.data.io import save_image

    shape = (512, 512, slices)
    sp = (0.75, 0.75, 5.0)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp,
                                                                            strict=True)],
                          indexing="ij", sparse=True)
    vol = np.full(shape, -1000.0, np.float32)
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    vol[np.broadcast_to(body, shape)] = 40.0
    for cx in (-80, 80):
        lung = ((x - cx) / 60) ** 2 + ((y + 10) / 80) ** 2 + (z / 140) ** 2 <= 1
        vol[lung] = -820.0
    vol[((x - 15) / 50) ** 2 + ((y + 30) / 45) ** 2 + ((z + 20) / 55) ** 2 <= 1] = 45.0
    vol[np.broadcast_to((x / 15) ** 2 + ((y - 85) / 15) ** 2 <= 1, shape)] = 700.0
    vol += np.random.default_rng(0).normal(0, 15, shape).astype(np.float32)
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    save_image(path, np.round(vol).astype(np.int16), aff)
    return f"synthetic chest CT, 512x512x{slices}, 0.75x0.75x5 mm"


# ---- one configuration (child process) -------------------------------------------------------
def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import hermes
    import hermes.models as hm

    model, device = cfg["model"], torch.device(cfg["device"])
    t0 = time.perf_counter()
    net = hm.load(model).to(device)
    net.hermes_metadata = dict(hm.read_header(model).get("metadata", {}))
    t_model = time.perf_counter() - t0
    # first forward of the process: one-off lazy imports (CUDA context, cuBLAS), kept out of
    # the step timings
    t0 = time.perf_counter()
    with torch.inference_mode():
        net(torch.zeros(1, 1, 32, 32, 32, device=device), tasks=[net.vocab.usable_tasks()[0]],
            modality=net.vocab.modalities[0])
    first = time.perf_counter() - t0
    rss0 = status_bytes("VmRSS") or 0
    exact = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict = {}
    res = hermes.segment(cfg["image"], modality=cfg["modality"], model=net, device=device,
                         fast=cfg["fast"], sw_batch_size=cfg["sw_batch_size"], timings=timings)
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if cfg.get("labels_to"):
        np.save(cfg["labels_to"], res.labels)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res.save(d)
    timings["save"] = time.perf_counter() - t0
    timings["load"] += t_model
    timings["total"] += t_model + timings["save"]
    peak = status_bytes("VmHWM") or 0
    return {"timings": timings, "first_forward_s": first, "peak_rss_bytes": peak,
            "peak_gpu_bytes": gpu_peak,
            "peak_above_start_bytes": peak - rss0 if exact else None,
            "windows": res.settings["windows"], "model_grid": res.settings["model_grid_shape"],
            "image_shape": list(res.shape), "tasks": len(res.task_names)}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.4f} %"


# ---- driver ----------------------------------------------------------------------------------
def stand_in_model(preset: str, path: Path) -> None:
    import hermes.models as hm

    ct = ["body", "lungs", "heart", "spine", "liver", "spleen", "kidney_left", "kidney_right"]
    t1 = ["brain", "gm", "wm", "csf"]
    net = hm.build(preset, tasks=ct + t1, modalities=["CT", "PET", "T1", "T2", "CINE"],
                   groups={"ct": {"tasks": ct, "modality": "CT"},
                           "brain": {"tasks": t1, "modality": "T1"}})
    hm.save(net, path, metadata={"preprocess": {"spacing": [1.5, 1.5, 1.5]},
                                 "train_config": {"crop_size": [96, 96, 96]},
                                 "note": "random stand-in for the embedded model"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="checkpoint (default: embedded, else stand-in)")
    ap.add_argument("--preset", default="tiny", help="stand-in preset when no model is found")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--ct-slices", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="small CT (24 slices)")
    ap.add_argument("--inputs", default="head_t1,chest_ct", help="comma-separated subset")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the network runs")
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_segment_"))
    model = args.model
    model_desc = model
    if model is None:
        from hermes.models.default import default_model_path

        if default_model_path().is_file():
            model, model_desc = str(default_model_path()), "embedded default model"
        else:
            model = str(work / "stand_in.hermes")
            stand_in_model(args.preset, Path(model))
            model_desc = f"random '{args.preset}' stand-in (embedded model absent)"
    slices = 24 if args.quick else args.ct_slices
    inputs = {
        "head_t1": (work / "head_t1.nii.gz", "T1"),
        "chest_ct": (work / "chest_ct.nii.gz", "CT"),
    }
    makers = {"head_t1": lambda p: make_head_t1(p), "chest_ct": lambda p: make_chest_ct(p, slices)}
    desc = {n: makers[n](p) for n, (p, _) in inputs.items() if n in args.inputs.split(",")}
    # the last mode: PyTorch's own convolution choice (slow_conv3d for batch-1 small maps) and
    # unfused instance norm + ReLU, i.e. the backbone before hermes.ops.conv3d/norm took over
    pytorch_paths = {"HERMES_ONEDNN_CONV": "0", "HERMES_FUSED_NORM": "0"}
    modes = [("standard", False, 1, {}), ("fast", True, 1, {}),
             ("standard, sw_batch 2", False, 2, {}),
             ("standard, PyTorch conv/norm paths", False, 1, pytorch_paths)]
    gpu = args.device.startswith("cuda")
    if gpu:  # those paths are CPU ones; on a GPU the fused prior attention is compared instead
        modes = [("standard", False, None, {}), ("standard, sw_batch 1", False, 1, {}),
                 ("standard, reference prior attention", False, None,
                  {"HERMES_PRIOR_IMPL": "reference"})]
    rows = []
    for name, (path, modality) in inputs.items():
        if name not in args.inputs.split(","):
            continue
        for mode, fast, swb, extra_env in modes:
            cfg = {"image": str(path), "modality": modality, "model": model, "fast": fast,
                   "sw_batch_size": swb, "threads": args.threads, "device": args.device,
                   "labels_to": str(work / f"{name}_{len(rows)}.npy")}
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **extra_env)
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{name} {mode} failed")
            r = json.loads(line[0][7:])
            r.update(input=name, mode=mode)
            if mode != "standard":  # label agreement with the standard mode of this input
                ref = next(x for x in rows if x["input"] == name and x["mode"] == "standard")
                a, b = np.load(cfg["labels_to"]), np.load(ref["labels_to"])
                r["label_agreement"] = float((a == b).mean())
            r["labels_to"] = cfg["labels_to"]
            rows.append(r)
            t = r["timings"]
            print(f"{name:<9} {mode:<21} total {t['total']:7.2f} s  load {t['load']:6.2f}  "
                  f"pre {t['preprocess']:6.2f}  inf {t['inference']:7.2f}  back "
                  f"{t['writeback']:6.2f}  save {t['save']:5.2f}  windows {r['windows']:3d}  "
                  f"peak {r['peak_rss_bytes'] / 2**30:5.2f} GiB"
                  + (f"  GPU {r['peak_gpu_bytes'] / 2**30:5.2f} GiB" if gpu else "")
                  + (f"  labels = standard's in {100 * r['label_agreement']:.4f} %"
                     if "label_agreement" in r else ""), flush=True)

    import torch

    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(args.device) if gpu else "cpu",
            "threads": args.threads, "torch": torch.__version__, "model": model_desc,
            "inputs": desc, "quick": args.quick, "roi_tolerance": 0.125,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    subset = "" if set(args.inputs.split(",")) >= set(inputs) else "_" + "_".join(
        n for n in inputs if n in args.inputs.split(","))
    dev = "cuda" if gpu else "cpu"
    out = HERE / "results" / f"segment_{dev}{'_quick' if args.quick else ''}{subset}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    where = f"{meta['device']} + CPU" if gpu else "CPU"
    lines = [f"# hermes.segment on {where} ({args.threads} threads, {meta['date']})", "",
             f"Model: {model_desc}. Inputs: " + "; ".join(f"{k}: {v}" for k, v in desc.items()),
             "", "| input | mode | windows | load s | preprocess s | inference s | write-back s "
             "| save s | total s | peak RSS GiB | peak above start GiB | GPU peak GiB "
             "| labels = standard's |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings"]
        above = r["peak_above_start_bytes"]
        lines.append(
            f"| {r['input']} | {r['mode']} | {r['windows']} | {t['load']:.2f} | "
            f"{t['preprocess']:.2f} | {t['inference']:.2f} | {t['writeback']:.2f} | "
            f"{t['save']:.2f} | {t['total']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{'-' if above is None else f'{above / 2**30:.2f}'} | "
            f"{_gib(r['peak_gpu_bytes'])} | {_percent(r.get('label_agreement'))} |")
    first = np.median([r["first_forward_s"] for r in rows])
    lines += ["", f"First forward of a process (one-off lazy imports, not in the rows): "
              f"{first:.1f} s (median)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
