"""``hermes train`` and ``hermes evaluate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes.data.cache import PreprocessedCollection


def open_cache(source: str, cache_dir: str | None, workers: int | None,
               progress: bool) -> PreprocessedCollection:
    """A preprocessed collection from a cache folder, or from a collection YAML (preprocessed
    first; cases already cached and verified are skipped)."""
    path = Path(source)
    if path.is_dir() and (path / "collection.json").exists():
        return PreprocessedCollection(path)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        from hermes.data.preprocess import preprocess

        return preprocess(path, cache_dir=cache_dir, workers=workers, progress=progress)
    raise FileNotFoundError(f"{source} is neither a collection YAML nor a preprocessed cache")


def _names(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; None stays None."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _train(args: argparse.Namespace) -> int:
    from hermes.training.trainer import TrainConfig, train

    pc = open_cache(args.collection, args.cache_dir, args.workers, not args.quiet)
    out = args.out or str(Path("runs") / f"{pc.name}-{args.preset}")
    cfg = TrainConfig(
        cache_dir=str(pc.cache_dir), out_dir=out, preset=args.preset,
        crop_size=tuple(args.crop) if len(args.crop) == 3 else (args.crop[0],) * 3,
        batch_size=args.batch_size, steps=args.steps, optimizer=args.optimizer, lr=args.lr,
        amp=args.amp, seed=args.seed, workers=args.workers if args.workers is not None else 2,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=not args.quiet,
        ema_decay=args.ema, augment=not args.no_augment, datasets=_names(args.datasets),
        modality_shuffle=args.modality_shuffle,
    )
    path = train(cfg, resume=args.resume)
    if not args.quiet:
        print(f"model written to {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import hermes.models as hm
    from hermes.training.evaluate import evaluate

    model = hm.load(args.model)
    pc = open_cache(args.collection, args.cache_dir, None, not args.quiet)
    roi = args.roi
    if roi is None:
        crop = hm.read_header(args.model)["metadata"].get("train_config", {}).get("crop_size")
        roi = list(crop) if crop else [96]
    roi = tuple(roi) if len(roi) == 3 else (roi[0],) * 3
    res = evaluate(model, pc, split=args.split, roi=roi, overlap=args.overlap,
                   tolerance_mm=args.tolerance, device=args.device, progress=not args.quiet,
                   datasets=_names(args.datasets))
    out = Path(args.out or f"metrics_{args.split}.csv")
    res.write_csv(out)
    print(res.table())
    print(f"per-case metrics written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a universal model on a dataset collection")
    t.add_argument("collection", help="collection YAML (preprocessed first) or a cache folder")
    t.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "large"])
    t.add_argument("--out", help="run folder (default runs/<collection>-<preset>)")
    t.add_argument("--cache-dir", help="preprocessing cache (default next to the YAML)")
    t.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--crop", type=int, nargs="+", default=[96], help="crop size (1 or 3 ints)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "lamb"])
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    t.add_argument("--ema", type=float, default=0.99, help="EMA decay")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=None, help="data loader / preprocessing workers")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--device", default="auto")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--datasets", help="train on these datasets only (comma-separated)")
    t.add_argument("--modality-shuffle", type=float, default=0.0, metavar="F",
                   help="fraction of crops given a random modality prior, so that the modality "
                        "head learns to detect the modality from the image (default 0)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=_train)

    e = sub.add_parser("evaluate", help="Dice / NSD / HD95 per dataset and task")
    e.add_argument("model", help="a Hermes checkpoint (.hermes)")
    e.add_argument("collection", help="collection YAML or preprocessed cache folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--cache-dir")
    e.add_argument("--roi", type=int, nargs="+", help="window size (default: training crop)")
    e.add_argument("--overlap", type=float, default=0.5)
    e.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm")
    e.add_argument("--device", default="cpu")
    e.add_argument("--datasets", help="evaluate these datasets only (comma-separated)")
    e.add_argument("--out", help="per-case CSV (default metrics_<split>.csv)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(handler=_evaluate)
