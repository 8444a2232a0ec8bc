"""``hermes finetune`` and ``hermes priors``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hermes._text import positive_int
from hermes.inference.segment import device_option
from hermes.training.trainer import CHECKPOINT_EVERY

#: ``hermes finetune`` options that define a run: option -> (key in the run's finetune.json or
#: config.json, default). Left out on ``--resume``, they are the run's.
_SETTING_OPTIONS: dict[str, tuple[str, object]] = {
    "mode": ("mode", "full"), "init": ("init", "similar"),
    "rehearsal_fraction": ("rehearsal_fraction", 0.5), "distill": ("distill_weight", None),
    "freeze_shared": ("freeze_shared", False), "new_decoder": ("new_decoder", False),
    "prior_lr_scale": ("prior_lr_scale", 1.0),
}
_TRAIN_OPTIONS: dict[str, tuple[str, object]] = {
    "steps": ("steps", 500), "batch_size": ("batch_size", 2), "crop": ("crop_size", None),
    "optimizer": ("optimizer", "adamw"), "lr": ("lr", None), "ema": ("ema_decay", 0.99),
    "seed": ("seed", 0), "no_augment": ("augment", False),
    "checkpoint_every": ("checkpoint_every", CHECKPOINT_EVERY),
}


def _base_name(model: Path) -> str:
    """The base model's name in the default run folder: its run folder's name for a run's
    ``model.hermes`` (or the folder given), else the file's stem."""
    from hermes.models.checkpoint import RUN_MODEL_FILE

    if model.is_dir() or model.name == RUN_MODEL_FILE:
        return (model if model.is_dir() else model.parent).resolve().name
    return model.stem


def _fill_options(args: argparse.Namespace, out: Path) -> None:
    """Set the run options left out (None): on ``--resume``, the run's own (from ``out``),
    else the defaults."""
    from hermes.training.commands import read_run_json

    saved: dict = {}
    if args.resume:
        for name in ("config.json", "finetune.json"):
            if (out / name).is_file():
                saved.update(read_run_json(out / name))
    for option, (key, default) in {**_SETTING_OPTIONS, **_TRAIN_OPTIONS}.items():
        if getattr(args, option) is not None:
            continue
        if key in saved and not (option == "rehearsal_fraction" and args.rehearsal
                                 and not saved[key]):  # the run had no rehearsal
            value = saved[key]
            if option == "no_augment":
                value = not value
            elif option == "crop" and value is not None:
                value = list(value)
            setattr(args, option, value)
        else:
            setattr(args, option, default)


def _finetune(args: argparse.Namespace) -> int:
    import hermes.models as hm
    from hermes.training.commands import crop_option, default_run_folder, open_cache_once
    from hermes.training.finetune import finetune
    from hermes.training.trainer import _dist_info

    if args.crop is not None:
        crop_option(args.crop)
    # a collection not preprocessed yet is resampled as the base model's training data
    base = hm.read_header(args.model)["metadata"].get("preprocess") or {}
    pc = open_cache_once(args.collection, args.cache_dir, args.workers, not args.quiet, base,
                         args.device)
    rehearsal = None
    if args.rehearsal:
        rehearsal = open_cache_once(args.rehearsal, None, args.workers, not args.quiet, base,
                                    args.device)
    variant = "-new-decoder" if args.new_decoder else "-frozen" if args.freeze_shared else ""
    base_name = _base_name(Path(args.model))
    out = args.out or str(default_run_folder(
        Path("runs") / f"{base_name}-{args.mode or 'full'}{variant}-{pc.name}",
        f"{base_name}-*-{pc.name}", args.resume))
    _fill_options(args, Path(out))
    # without --crop, finetune() takes the base model's training crop
    crop = {"crop_size": crop_option(args.crop)} if args.crop else {}
    res = finetune(
        args.model, pc, out, mode=args.mode, init=args.init, rehearsal=rehearsal,
        rehearsal_fraction=args.rehearsal_fraction, distill=args.distill, resume=args.resume,
        freeze_shared=args.freeze_shared, new_decoder=args.new_decoder,
        prior_lr_scale=args.prior_lr_scale,
        **crop, batch_size=args.batch_size, steps=args.steps, optimizer=args.optimizer,
        lr=args.lr, seed=args.seed, workers=args.workers if args.workers is not None else 2,
        checkpoint_every=args.checkpoint_every, device=args.device, progress=not args.quiet,
        ema_decay=args.ema, augment=not args.no_augment,
    )
    if not args.quiet and _dist_info()[1] == 0:
        for name, src in res.plan["tasks"].items():
            print(f"new task {name}: prior initialised from {src or 'random'}")
        for name, src in res.plan["modalities"].items():
            print(f"new modality {name}: prior initialised from {src or 'random'}")
        if args.new_decoder:
            print(f"new tasks segmented by decoder branch {len(res.model.branches) - 1}")
        print(f"trained {res.trainable:,} of {res.parameters:,} parameters ({args.mode})")
        print(f"model written to {res.path}")
    return 0


def _priors(args: argparse.Namespace) -> int:
    import hermes.models as hm
    from hermes.analysis.priors import analyse_priors

    model = hm.load_model_file(args.model)  # official Hermes-R weights too, as `hermes tasks`
    summary = analyse_priors(model, args.out, k=args.top, png=not args.no_png,
                             modality_reduce=args.modality_reduce, center=args.center,
                             png_levels=not args.no_level_png, force=args.force)
    print((Path(args.out) / "nearest_neighbours.txt").read_text(), end="")
    print(f"{len(summary['files'])} files written to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("finetune", help="add a collection's new tasks to a trained model and "
                                        "fine-tune (transfer / incremental learning)")
    f.add_argument("model", help="a trained Hermes checkpoint (.hermes) or a training run's folder")
    f.add_argument("collection", help="collection YAML or one dataset's folder (with its "
                   "dataset.json; preprocessed first), or a cache folder")
    f.add_argument("--mode", choices=["full", "priors", "incremental", "modality"],
                   help="full: all weights train; priors: only new priors and heads; "
                        "incremental: old priors frozen, old tasks distilled/rehearsed; "
                        "modality: only the modality head, trained to detect the modality "
                        "(default full)")
    f.add_argument("--init", choices=["similar", "random"],
                   help="new prior rows from the most similar old prior (default), or random")
    f.add_argument("--rehearsal", help="old collection (YAML or cache) to rehearse on")
    f.add_argument("--rehearsal-fraction", type=float,
                   help="fraction of samples drawn from --rehearsal (default 0.5)")
    f.add_argument("--distill", type=float, default=None,
                   help="distillation weight (default 1 in incremental mode, else 0)")
    f.add_argument("--freeze-shared", action="store_true", default=None,
                   help="incremental: train only the new prior rows (old tasks stay exact)")
    f.add_argument("--new-decoder", action="store_true", default=None,
                   help="incremental: new tasks get their own trainable decoder on the frozen "
                        "encoder (old tasks stay exact)")
    f.add_argument("--prior-lr-scale", type=float,
                   help="learning-rate multiplier of the prior tables (default 1)")
    f.add_argument("--out", "-o",
                   help="run folder (default runs/<model>-<mode>[-new-decoder|-frozen]-"
                        "<collection>; <model>: the base run's folder name for its "
                        "model.hermes)")
    f.add_argument("--cache-dir", help="preprocessing cache (default next to the YAML)")
    f.add_argument("--steps", type=int, help="optimiser steps (default 500)")
    f.add_argument("--batch-size", type=int, help="default 2")
    f.add_argument("--crop", type=int, nargs="+",
                   help="crop size (1 or 3 ints; default: the base model's training crop, which "
                        "hermes segment uses as its window)")
    f.add_argument("--optimizer", choices=["adamw", "lamb"], help="default adamw")
    f.add_argument("--lr", type=float, help="default 3e-4 (AdamW) / 2e-3 (LAMB)")
    f.add_argument("--ema", type=float, help="EMA decay (default 0.99)")
    f.add_argument("--seed", type=int, help="default 0")
    f.add_argument("--workers", type=int, default=None)
    f.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help=f"steps between checkpoints (default {CHECKPOINT_EVERY}, or the "
                        "resumed run's)")
    f.add_argument("--device", default="auto", type=device_option,
                   help="auto (default: CUDA when usable), cpu, cuda, cuda:1 ...")
    f.add_argument("--no-augment", action="store_true", default=None)
    f.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its own settings (options left out "
                        "are the run's; changed ones are refused)")
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(handler=_finetune)

    p = sub.add_parser("priors", help="similarity of a model's learned task and modality priors")
    p.add_argument("model", help="a Hermes checkpoint (.hermes) or a training run's folder")
    p.add_argument("--out", "-o", required=True, help="output folder (CSV, PNG, text summary)")
    p.add_argument("--top", type=positive_int, default=3,
                   help="neighbours listed per task (default 3)")
    p.add_argument("--modality-reduce", default="flatten", choices=["flatten", "mean"],
                   help="compare modality tokens position by position, or their mean")
    p.add_argument("--center", default="none", choices=["none", "groups"],
                   help="groups: subtract each dataset group's mean task prior first")
    p.add_argument("--no-png", action="store_true", help="CSV and text only")
    p.add_argument("--no-level-png", action="store_true",
                   help="heatmaps of the concatenated similarity only")
    p.add_argument("--force", action="store_true",
                   help="replace the files of an earlier analysis (or others of their names) "
                        "in --out")
    p.set_defaults(handler=_priors)
