"""``hermes segment`` and ``hermes demo`` (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

__all__ = ["register", "example_path", "EXAMPLE_NAME", "EXAMPLE_MODALITY"]

#: The real example image shipped with the package (see DATA.md) and its modality.
EXAMPLE_NAME = "mni152_t1_brain_2mm.nii.gz"
EXAMPLE_MODALITY = "T1"

_OUTPUT_NAMES = ("labels.nii.gz", "labels.json", "statistics.json", "statistics.csv",
                 "preview.png", "structures", "probabilities")


def example_path() -> Path:
    """Path of the bundled example image (``hermes/data/examples/``)."""
    return Path(str(resources.files("hermes.data").joinpath("examples", EXAMPLE_NAME)))


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _check_outdir(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse to overwrite earlier outputs without ``--force`` and never write over an input."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    # checked before inference runs, not when the results are written minutes later
    base = out.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output folder {out}: {base} is not a writable "
                              "folder")
    existing = [n for n in _OUTPUT_NAMES if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(
            f"output folder {out} already holds {', '.join(existing)}; pass --force to "
            "overwrite or choose another -o")
    resolved = {p.resolve() for p in inputs}
    for n in _OUTPUT_NAMES:
        if (out / n).resolve() in resolved or any(
                (out / n).resolve() in p.parents for p in resolved):
            raise FileExistsError(f"output {out / n} would overwrite the input; choose another -o")


def _parse_postprocess(args: argparse.Namespace):
    if not args.largest_component and not args.min_volume_ml:
        return None
    return {"largest": bool(args.largest_component), "min_volume_ml": float(args.min_volume_ml)}


def _print_summary(res, written: dict, out: Path, elapsed: float) -> None:
    det = ""
    if res.detection:
        det = f" (detected, confidence {res.detection['confidence']:.2f})"
    print(f"modality: {res.modality}{det}")
    width = max([len(n) for n in res.task_names] + [9])
    print(f"{'label':>5}  {'structure':<{width}}  {'volume ml':>10}  {'mean int.':>10}")
    for s in res.statistics:
        mi = "-" if s["mean_intensity"] is None else f"{s['mean_intensity']:.1f}"
        print(f"{s['label']:>5}  {s['task']:<{width}}  {s['volume_ml']:>10.2f}  {mi:>10}")
    print(f"outputs ({elapsed:.1f} s) in {out}:")
    for key, p in written.items():
        if ":" not in key:
            print(f"  {p}")
    n_struct = sum(1 for k in written if k.startswith("mask:"))
    if n_struct:
        print(f"  {out / 'structures'}/ ({n_struct} masks)")
    n_prob = sum(1 for k in written if k.startswith("prob:"))
    if n_prob:
        print(f"  {out / 'probabilities'}/ ({n_prob} maps)")


def _run(args: argparse.Namespace, image: Path, out: Path, modality: str,
         model: str | None) -> int:
    from hermes.inference.segment import MODALITY_HINT, ModalityDetectionError, segment

    _check_outdir(out, args.force, [image])
    t0 = time.perf_counter()
    _log(args, f"hermes: segmenting {image} ({'fast' if args.fast else 'standard'} mode)")
    try:
        res = segment(
            str(image), tasks=getattr(args, "tasks", None), modality=modality, model=model,
            device=args.device, fast=args.fast, postprocess=_parse_postprocess(args),
            threshold=args.threshold, probabilities=getattr(args, "probabilities", False),
            progress=not args.quiet,
        )
    except ModalityDetectionError as exc:  # name the option, not the Python argument
        raise ModalityDetectionError(
            str(exc).replace(MODALITY_HINT, "pass --modality explicitly")) from None
    _log(args, "hermes: writing outputs")
    written = res.save(out, per_structure=getattr(args, "per_structure", False),
                       probabilities=getattr(args, "probabilities", False),
                       preview=not getattr(args, "no_preview", False))
    if not args.quiet:
        _print_summary(res, written, out, time.perf_counter() - t0)
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    image = Path(args.input)
    if not image.exists():
        raise FileNotFoundError(f"input {image} does not exist")
    return _run(args, image, Path(args.output), args.modality, args.model)


def _cmd_demo(args: argparse.Namespace) -> int:
    image = example_path()
    if not image.is_file():
        raise FileNotFoundError(f"the bundled example {image} is missing from this installation")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"demo output folder {out} exists and is not empty; pass --force "
                              "to overwrite it or -o for another folder")
    args.tasks = None
    return _run(args, image, out, EXAMPLE_MODALITY if args.modality is None else args.modality,
                args.model)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a .hermes checkpoint or an official Hermes-R .pth (default: the "
                        "embedded model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--fast", action="store_true",
                   help="faster, slightly less accurate: window overlap 0.25 instead of 0.5 and "
                        "linear instead of cubic resampling")
    p.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest connected component of every structure")
    p.add_argument("--min-volume-ml", type=float, default=0.0,
                   help="remove connected components smaller than this volume (mL)")
    p.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    p.add_argument("--force", action="store_true", help="overwrite earlier outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary output")


class _Once(argparse.Action):
    """An option that may be given once (argparse keeps the last of repeated ones)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: one image per `hermes segment` (run it "
                         "once per image, e.g. in a shell loop)")
        setattr(namespace, self.dest, values)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``demo`` to the ``hermes`` command."""
    seg = subparsers.add_parser(
        "segment", help="segment an image (NIfTI, NRRD or DICOM folder)",
        description="Segment a 3-D image; outputs lie on the input's original grid.")
    seg.add_argument("-i", "--input", required=True, action=_Once,
                     help="image file (.nii, .nii.gz, .nrrd, .nhdr) or DICOM series folder")
    seg.add_argument("-o", "--output", required=True, help="output folder")
    seg.add_argument("--tasks", default=None,
                     help="comma-separated task (or dataset-group) names; default: every task "
                          "of the modality (see `hermes tasks`)")
    seg.add_argument("--modality", default="auto",
                     help="CT, T1, T2, PET, CINE ... or auto (default: detected)")
    seg.add_argument("--per-structure", action="store_true",
                     help="also write one NIfTI mask per structure")
    seg.add_argument("--probabilities", action="store_true",
                     help="also write per-structure probability maps")
    _common(seg)
    seg.set_defaults(handler=_cmd_segment)

    demo = subparsers.add_parser(
        "demo", help="segment the bundled example image with the embedded model",
        description="Segment the bundled real example (the MNI152 ICBM 2009a T1 brain "
                    "template at 2 mm, see DATA.md) end to end on this machine.")
    demo.add_argument("-o", "--output", default=os.path.join(".", "hermes_demo_output"),
                      help="output folder (default ./hermes_demo_output)")
    demo.add_argument("--modality", default=None, help=argparse.SUPPRESS)
    _common(demo)
    demo.set_defaults(handler=_cmd_demo)
