"""``hermes train`` and ``hermes evaluate``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hermes._text import first_of, name_list, positive_int
from hermes.data.cache import PreprocessedCollection
from hermes.inference.segment import device_option, overlap_option
from hermes.models.hermes_resunet import check_spatial_size
from hermes.training.trainer import CHECKPOINT_EVERY, RankZeroFailed


def _say(line: str) -> None:
    """A line on stderr, prefixed as the command's messages are."""
    import sys

    print(f"hermes: {line}", file=sys.stderr, flush=True)


def open_cache(source: str, cache_dir: str | None, workers: int | None,
               progress: bool, defaults: dict | None = None) -> PreprocessedCollection:
    """A preprocessed collection from a cache folder, or from a collection YAML or one
    dataset's folder (preprocessed first; cases already cached and verified are skipped). A
    YAML's existing cache keeps its
    settings; a new one takes those of ``defaults`` (a model's ``preprocess`` metadata) where
    given."""
    path = Path(source)
    if path.is_dir() and (path / "collection.json").exists():
        return PreprocessedCollection(path)
    from hermes.data.collection import is_dataset_folder

    if (path.suffix.lower() in (".yaml", ".yml") and path.is_file()) or is_dataset_folder(path):
        from hermes.data.collection import load_collection
        from hermes.data.preprocess import preprocess, read_cache_file, resolve_cache_dir

        collection = load_collection(path)
        # a cache made by `hermes preprocess` with other settings (e.g. --spacing) keeps them,
        # except what the YAML itself sets (a changed `spacing:` is refused by preprocess)
        stored = read_cache_file(resolve_cache_dir(collection, cache_dir), "preprocess.json")
        if stored is None:
            stored = defaults or {}
        keys = ["image_order", "dtype", "max_fg_samples", "crop_nonzero"]
        if collection.spacing is None:
            keys.append("spacing")
        kept = {k: stored[k] for k in keys if k in stored}
        # a training run started beside another on the same collection waits for its cache
        return preprocess(collection, cache_dir=cache_dir, workers=workers, progress=progress,
                          waiting=_say, **kept)
    if path.is_dir() and (path / "preprocess.json").exists():
        raise FileNotFoundError(f"{source}: preprocessing did not finish (no collection.json); "
                                "re-run `hermes preprocess` on its collection YAML")
    raise FileNotFoundError(f"{source} is neither a collection YAML, a dataset folder (with "
                            "dataset.json) nor a preprocessed cache")


def open_cache_once(source: str, cache_dir: str | None, workers: int | None, progress: bool,
                    defaults: dict | None = None, device: str = "auto") -> PreprocessedCollection:
    """:func:`open_cache` in every process of a ``torchrun`` launch: rank 0 preprocesses what
    is missing while the other ranks wait (else every rank would preprocess the same cases at
    once), then they open the finished cache; a single process just opens it."""
    from datetime import timedelta

    import torch.distributed as dist

    from hermes.training.trainer import init_distributed

    world, rank = init_distributed(device)
    if world == 1:
        return open_cache(source, cache_dir, workers, progress, defaults)
    # a gloo group without the default timeout: preprocessing may take hours
    waiting = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    shared: list[object] = [None, None]  # (rank 0's error, the finished cache folder)
    try:
        if rank == 0:
            try:
                pc = open_cache(source, cache_dir, workers, progress, defaults)
                shared[1] = str(pc.cache_dir)
            except BaseException as exc:
                shared[0] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                dist.broadcast_object_list(shared, src=0, group=waiting)
            return pc
        dist.broadcast_object_list(shared, src=0, group=waiting)
    finally:
        dist.destroy_process_group(waiting)
    if shared[0] is not None:
        raise RankZeroFailed(f"rank 0 could not prepare {source}: {shared[0]}")
    # the cache rank 0 finished, opened as it is (preprocessing its YAML again would rewrite
    # collection.json while rank 0 reads it)
    return PreprocessedCollection(str(shared[1]))


def triple(values: list[int]) -> tuple[int, int, int]:
    """A size option given as 1 or 3 ints, as 3."""
    if len(values) not in (1, 3):
        raise ValueError(f"a size takes 1 or 3 values, got {len(values)}: {values}")
    return tuple(values) if len(values) == 3 else (values[0],) * 3  # type: ignore[return-value]


def crop_option(values: list[int]) -> tuple[int, int, int]:
    """``--crop`` as 3 sizes the network can take (checked before any preprocessing)."""
    crop = triple(values)
    check_spatial_size(crop, "--crop")
    return crop


#: ``hermes train`` options that define a run: option -> (TrainConfig field, default). Left out
#: on ``--resume``, they are taken from the run's config.json.
_RUN_OPTIONS: dict[str, tuple[str, object]] = {
    "preset": ("preset", "tiny"), "crop": ("crop_size", [96]), "batch_size": ("batch_size", 2),
    "steps": ("steps", 1000), "optimizer": ("optimizer", "adamw"), "lr": ("lr", None),
    "amp": ("amp", "auto"), "ema": ("ema_decay", 0.99), "seed": ("seed", 0),
    "no_augment": ("augment", False), "datasets": ("datasets", None),
    "modality_shuffle": ("modality_shuffle", 0.0),
}


def _run_settings(args: argparse.Namespace, saved: dict | None) -> dict:
    """TrainConfig fields of the run options: given ones, else the resumed run's, else the
    defaults; on a resume also the run's settings no option sets (e.g. from the Python API)."""
    from dataclasses import fields as dataclass_fields

    from hermes.training.trainer import RESUME_MAY_CHANGE, TrainConfig

    fields = {}
    if saved is not None:
        known = {f.name for f in dataclass_fields(TrainConfig)} - RESUME_MAY_CHANGE
        fields.update({k: v for k, v in saved.items() if k in known})
    for option, (name, default) in _RUN_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            if name in fields:  # the resumed run's, already a TrainConfig value
                continue
            value = default
        if option == "crop":
            value = triple(value)
        elif option == "no_augment":
            value = not value
        elif option == "datasets":
            value = name_list(value)
        fields[name] = value
    return fields


def default_run_folder(default: Path, candidates: str, resume: bool) -> Path:
    """The run folder when ``--out`` is not given: ``default`` (named after the options given
    now) or, with ``--resume`` when that holds no checkpoint, the one folder under ``runs/``
    matching the glob ``candidates`` that does (the options left out are the run's, so the
    name may not be rebuilt from them); several such runs are refused, naming them."""
    if not resume or (default / "last.ckpt").is_file():
        return default
    found = sorted(p for p in Path("runs").glob(candidates) if (p / "last.ckpt").is_file())
    if len(found) > 1:
        raise ValueError(f"--resume without --out: {len(found)} runs could be meant "
                         f"({first_of([str(p) for p in found], 4)}); name one with --out")
    return found[0] if found else default


def read_run_json(path: Path) -> dict:
    """A run's ``config.json`` / ``finetune.json``, or an error naming the file."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): it records the run's settings for "
                         "--resume; restore it, or start a new run with another --out") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a run's settings (a JSON object)")
    return data


def _train(args: argparse.Namespace) -> int:
    from hermes.training.trainer import TrainConfig, _dist_info, train

    if args.crop is not None:
        crop_option(args.crop)
    pc = open_cache_once(args.collection, args.cache_dir, args.workers, not args.quiet,
                         device=args.device)
    out = args.out or str(default_run_folder(Path("runs") / f"{pc.name}-{args.preset or 'tiny'}",
                                             f"{pc.name}-*", args.resume))
    saved = None
    if args.resume and (Path(out) / "config.json").is_file():
        saved = read_run_json(Path(out) / "config.json")
    every = args.checkpoint_every or (saved or {}).get("checkpoint_every") or CHECKPOINT_EVERY
    cfg = TrainConfig(
        cache_dir=str(pc.cache_dir), out_dir=out, **_run_settings(args, saved),
        workers=args.workers if args.workers is not None else 2,
        checkpoint_every=int(every), device=args.device, progress=not args.quiet,
    )
    path = train(cfg, resume=args.resume)
    if not args.quiet and _dist_info()[1] == 0:
        print(f"model written to {path}")
    return 0


def check_same_grid(trained: dict, cached: dict, model: str, cache: Path) -> None:
    """The cache must be resampled as the model's training data was (spacing, orientation):
    a model sees other anatomy sizes otherwise and its scores mean nothing."""
    for key, option in (("spacing", "--spacing"), ("axcodes", None)):
        want, have = trained.get(key), cached.get(key)
        if want is not None and have is not None and list(want) != list(have):
            hint = (f"; preprocess into another cache (`hermes preprocess YAML {option} "
                    f"{' '.join(f'{v:g}' for v in want)} --cache-dir DIR`) and give that cache "
                    "folder DIR instead of the YAML" if option else "")
            raise ValueError(f"{model} was trained on data with {key} {list(want)} but the cache "
                             f"{cache} has {list(have)}{hint}")


def metrics_path(out: str | None, split: str) -> Path:
    """Where ``hermes evaluate`` writes its CSV, checked before evaluating: ``--out`` (a folder:
    ``metrics_<split>.csv`` inside), default ``metrics_<split>.csv``; an existing file is
    replaced only if it is such a CSV."""
    from hermes.training.evaluate import METRIC_FIELDS

    path = Path(out or f"metrics_{split}.csv")
    if out and out.endswith(("/", os.sep)) and not path.exists() and path.parent.is_dir():
        path.mkdir()  # `--out newdir/`: a folder, as written
    if path.is_dir():
        path = path / f"metrics_{split}.csv"
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {path}: folder {path.parent} does not exist")
    if path.exists():
        try:
            with open(path, newline="") as f:
                first = f.readline().strip()
        except (OSError, UnicodeDecodeError):
            first = ""
        if first != ",".join(METRIC_FIELDS):
            raise FileExistsError(f"--out {path} exists and is not a metrics CSV of `hermes "
                                  "evaluate`: choose another --out")
    return path


def _report(res, out: Path) -> int:
    """Print an evaluation's table (first: nothing is lost if writing fails), then its CSV."""
    print(res.table())
    res.write_csv(out)
    print(f"per-case metrics written to {out}")
    return 0


def _evaluate_folder(args: argparse.Namespace) -> int:
    from hermes.training.evaluate_folder import evaluate_folder

    out = metrics_path(args.out, "folder")
    res = evaluate_folder(args.gt, args.pred, args.labels, args.tolerance, not args.quiet,
                          args.predicted_only)
    return _report(res, out)


def _evaluate(args: argparse.Namespace) -> int:
    import hermes.models as hm
    from hermes.training.evaluate import evaluate

    out = metrics_path(args.out, args.split)  # refused before hours of evaluation
    roi = None if args.roi is None else triple(args.roi)  # refused before any preprocessing
    model = hm.load(args.model)
    meta = model.hermes_metadata
    # a collection not preprocessed yet is resampled as the model's training data
    pc = open_cache(args.collection, args.cache_dir, None, not args.quiet,
                    meta.get("preprocess"))
    check_same_grid(meta.get("preprocess") or {}, pc.params, args.model, pc.cache_dir)
    if roi is None:
        crop = meta.get("train_config", {}).get("crop_size")
        roi = triple(list(crop) if crop else [96])
    res = evaluate(model, pc, split=args.split, roi=roi, overlap=args.overlap,
                   tolerance_mm=args.tolerance, device=args.device, progress=not args.quiet,
                   datasets=name_list(args.datasets))
    return _report(res, out)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a universal model on a dataset collection")
    t.add_argument("collection", help="collection YAML or one dataset's folder (with its "
                   "dataset.json; preprocessed first), or a cache folder")
    # run options default to None: their defaults (_RUN_OPTIONS) apply unless --resume finds them
    t.add_argument("--preset", choices=["tiny", "small", "base", "large"],
                   help="model size (default tiny)")
    t.add_argument("--out", "-o", help="run folder (default runs/<collection>-<preset>)")
    t.add_argument("--cache-dir", help="preprocessing cache (default next to the YAML, or "
                   "hermes_cache_<folder name>/ beside a dataset folder)")
    t.add_argument("--steps", type=int, help="optimiser steps (default 1000)")
    t.add_argument("--batch-size", type=int, help="crops per step and process (default 2)")
    t.add_argument("--crop", type=int, nargs="+", help="crop size, 1 or 3 ints (default 96)")
    t.add_argument("--optimizer", choices=["adamw", "lamb"], help="default adamw")
    t.add_argument("--lr", type=float, help="default 3e-4 (AdamW) / 2e-3 (LAMB)")
    t.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="default auto")
    t.add_argument("--ema", type=float, help="EMA decay (default 0.99)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--workers", type=int, default=None, help="data loader / preprocessing workers")
    t.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help=f"steps between checkpoints (default {CHECKPOINT_EVERY}, or the "
                   "resumed run's)")
    t.add_argument("--device", default="auto", type=device_option,
                   help="auto (default: CUDA when usable), cpu, cuda, cuda:1 ...")
    t.add_argument("--no-augment", action="store_true", default=None)
    t.add_argument("--datasets", nargs="+",
                   help="train on these datasets only (names separated by spaces or commas)")
    t.add_argument("--modality-shuffle", type=float, metavar="F",
                   help="fraction of crops given a random modality prior, so that the modality "
                        "head learns to detect the modality from the image (default 0)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its own settings (options left out "
                        "are the run's; changed ones, --steps included, are refused)")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(handler=_train)

    e = sub.add_parser("evaluate", help="Dice / NSD / HD95 per dataset and task")
    e.add_argument("model", help="a Hermes checkpoint (.hermes) or a training run's folder")
    e.add_argument("collection", help="collection YAML, one dataset's folder (with its "
                   "dataset.json) or a preprocessed cache folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="cases to evaluate (default test)")
    e.add_argument("--cache-dir")
    e.add_argument("--roi", type=int, nargs="+", help="window size (default: training crop)")
    e.add_argument("--overlap", type=overlap_option, default=0.5, metavar="F",
                   help="sliding-window overlap in [0, 1) (default 0.5)")
    e.add_argument("--tolerance", type=float, default=2.0,
                   help="NSD tolerance in mm (default 2)")
    e.add_argument("--device", default="auto", type=device_option,
                   help="auto (default: CUDA when usable), cpu, cuda, cuda:1 ...")
    e.add_argument("--datasets", nargs="+",
                   help="evaluate these datasets only (names separated by spaces or commas)")
    e.add_argument("--out", "-o", help="per-case CSV, or a folder for metrics_<split>.csv (default "
                   "metrics_<split>.csv here); an existing file must be such a CSV")
    e.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (the results table is still printed)")
    e.set_defaults(handler=_evaluate)

    f = sub.add_parser("evaluate-folder",
                       help="score a folder of segmentations against ground-truth label maps",
                       description="Dice / NSD / HD95 of every ground-truth case "
                       "(GT/<case>.nii.gz) against PRED/<case>.nii.gz or a `hermes segment` "
                       "output PRED/<case>/labels.nii.gz, structures matched by name.")
    f.add_argument("gt", help="folder of ground-truth label maps (e.g. labelsTs)")
    f.add_argument("pred", help="folder of predictions")
    f.add_argument("--labels", help="the ground truth's label map: a dataset.json or JSON file "
                   "(default: the dataset.json in GT or its parent)")
    f.add_argument("--tolerance", type=float, default=2.0,
                   help="NSD tolerance in mm (default 2)")
    f.add_argument("--out", "-o", help="per-case CSV, or a folder for metrics_folder.csv (default "
                   "metrics_folder.csv here); an existing file must be such a CSV")
    f.add_argument("--predicted-only", action="store_true",
                   help="score only the cases PRED holds (default: a missing one is an error)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(handler=_evaluate_folder)
