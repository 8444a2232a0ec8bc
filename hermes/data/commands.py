"""Command-line subcommands of the data library, for ``hermes.cli`` to register.

``register(subparsers)`` adds::

    hermes preprocess COLLECTION.yaml [--cache-dir DIR] [--spacing MM [MM MM]] [--workers N]
                                      [--order 1|3] [--dtype float32|float16] [--overwrite]
    hermes data validate COLLECTION.yaml [--shallow] [--workers N]
    hermes data synthetic DIR [--seed S] [--cases N] [--datasets a b ...]
    hermes data starter DIR [--no-simulated] [--keep-downloads]

Each parser sets ``func``: call ``args.func(args)``; it returns the process exit code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hermes._text import command_name, name_list, positive_int

__all__ = ["register"]


def _preprocess(args: argparse.Namespace) -> int:
    from hermes.data.collection import CollectionError
    from hermes.data.preprocess import PreprocessError, preprocess
    from hermes.data.splits import SplitError

    spacing = args.spacing[0] if args.spacing and len(args.spacing) == 1 else args.spacing
    try:
        pc = preprocess(args.collection, cache_dir=args.cache_dir, spacing=spacing,
                        workers=args.workers, progress=not args.no_progress,
                        image_order=args.order, dtype=args.dtype, overwrite=args.overwrite,
                        verify_full=args.verify_full)
    except (CollectionError, PreprocessError, SplitError) as exc:
        print(f"{command_name(args)}: error: {exc}", file=sys.stderr)
        return 1
    print(f"cached {len(pc)} cases in {pc.cache_dir}")
    print(f"tasks ({len(pc.tasks)}): {', '.join(pc.tasks)}")
    print(f"modalities: {', '.join(pc.modalities)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from hermes.data.collection import CollectionError, load_collection

    try:
        coll = load_collection(args.collection)
    except CollectionError as exc:
        print(f"{command_name(args)}: error: {exc}", file=sys.stderr)
        return 1
    problems = coll.validate(deep=not args.shallow, workers=args.workers or 1,
                             progress=not args.no_progress)
    if problems:
        print(f"{len(problems)} problem(s) in {args.collection}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{coll!r}: no problems")
    print(f"tasks ({len(coll.tasks)}): {', '.join(coll.tasks)}")
    return 0


def _existing_outputs(out: Path, names: list[str], force: bool) -> str | None:
    """An error naming what ``out`` already holds of a collection about to be written there
    (``collection.yaml``, the dataset folders ``names``), unless ``force``: then the dataset
    folders are removed so that no case of an earlier run stays behind."""
    clash = [p for p in (out / "collection.yaml", *(out / n for n in names)) if p.exists()]
    if clash and not force:
        return (f"{out} already holds {', '.join(p.name for p in clash)}: choose another "
                "folder, or pass --force to replace them")
    for p in clash:
        if p.is_dir():
            shutil.rmtree(p)
    return None


def _synthetic(args: argparse.Namespace) -> int:
    from hermes.data.synthetic import ALL_DATASETS, DEFAULT_DATASETS, generate_collection

    names = name_list(args.datasets) or list(DEFAULT_DATASETS)
    unknown = [n for n in names if n not in ALL_DATASETS]
    if unknown:
        print(f"{command_name(args)}: error: unknown synthetic dataset(s) {unknown}; choose from "
              f"{', '.join(ALL_DATASETS)}", file=sys.stderr)
        return 2
    error = _existing_outputs(Path(args.dir), names, args.force)
    if error:
        print(f"{command_name(args)}: error: {error}", file=sys.stderr)
        return 1
    path = generate_collection(args.dir, seed=args.seed, cases_per_dataset=args.cases,
                               datasets=names)
    print(f"wrote synthetic collection {path}")
    return 0


def _starter(args: argparse.Namespace) -> int:
    from hermes.data.starter import SOURCE_DATASETS, SOURCES, StarterError, build_starter_collection

    sources = name_list(args.sources) or list(SOURCES)
    folders = [d for s in sources for d in SOURCE_DATASETS.get(s, [])
               if not (args.no_simulated and d.endswith("_SIMULATED"))]
    error = _existing_outputs(Path(args.dir), folders, args.force)
    if error:
        print(f"{command_name(args)}: error: {error}", file=sys.stderr)
        return 1
    try:
        path = build_starter_collection(args.dir, simulated=not args.no_simulated,
                                        keep_downloads=args.keep_downloads,
                                        sources=sources)
    except StarterError as exc:
        print(f"{command_name(args)}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote starter collection {path} (see PROVENANCE.md next to it)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``preprocess`` and ``data`` subcommands to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "preprocess", help="validate a dataset collection and cache it for training",
        description="Reorient (RAS), crop to non-zero, normalise per modality, resample and "
        "cache every case of a collection YAML as memory-mappable arrays. Resumable.")
    p.add_argument("collection", help="collection YAML, or one dataset's folder (with its "
                   "dataset.json)")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default: the YAML's cache_dir or hermes_cache_<YAML "
                   "name>/ next to it; for a dataset folder hermes_cache_<folder name>/ beside "
                   "it)")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                   help="target spacing in mm, one value or three (default: YAML or 1.5)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default min(4, CPUs))")
    p.add_argument("--order", type=int, default=3, choices=[1, 3],
                   help="image interpolation: 1 linear, 3 cubic spline (default; labels: "
                   "nearest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="allow replacing a cache made with other parameters")
    p.add_argument("--verify-full", action="store_true",
                   help="re-hash cached arrays before skipping done cases")
    p.add_argument("--no-progress", "-q", "--quiet", action="store_true", dest="no_progress",
                   help="no progress bar")
    p.set_defaults(func=_preprocess)

    d = subparsers.add_parser("data", help="dataset tools: validate, synthetic, starter")
    ds = d.add_subparsers(dest="data_command", metavar="{validate,synthetic,starter}")
    ds.required = True

    v = ds.add_parser("validate", help="report every problem of a collection")
    v.add_argument("collection", help="collection YAML, or one dataset's folder (with its "
                   "dataset.json)")
    v.add_argument("--shallow", action="store_true",
                   help="headers only (skip reading label values and image voxels)")
    v.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    v.add_argument("--no-progress", "-q", "--quiet", action="store_true", dest="no_progress",
                   help="no progress bar")
    v.set_defaults(func=_validate)

    s = ds.add_parser("synthetic", help="write a seeded synthetic multi-modality collection")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed writes the same collection")
    s.add_argument("--cases", type=positive_int, default=3, help="cases per dataset (default 3)")
    s.add_argument("--datasets", nargs="+", default=None,
                   help="synth_ct synth_t1 synth_t2 synth_pet synth_cine")
    s.add_argument("--force", action="store_true",
                   help="replace a collection.yaml and dataset folders already in DIR")
    s.set_defaults(func=_synthetic)

    st = ds.add_parser(
        "starter", help="build a small real collection from pip/apt-downloadable sources",
        description="Downloads (pip download / apt-get download) public packages that ship "
        "medical images, derives labels, and writes an MSD-layout collection with provenance "
        "and licences. T2 and PET volumes are SIMULATED from real T1 data and marked so.")
    st.add_argument("dir")
    st.add_argument("--no-simulated", action="store_true", help="skip simulated T2/PET")
    st.add_argument("--keep-downloads", action="store_true",
                    help="keep the downloaded packages in DIR/downloads")
    st.add_argument("--sources", nargs="+", default=None,
                    help="subset of: pyradiomics (chest CT), invesalius (head CT; needs "
                    "apt-get), nilearn, nimare (T1) (default: all)")
    st.add_argument("--force", action="store_true",
                    help="replace a collection.yaml and dataset folders already in DIR")
    st.set_defaults(func=_starter)
