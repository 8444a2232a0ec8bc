"""``hermes segment`` and ``hermes demo`` (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from hermes._text import first_of
from hermes.inference.segment import device_option, overlap_option

__all__ = ["register", "example_path", "folder_cases", "EXAMPLE_NAME", "EXAMPLE_MODALITY"]

#: The real example image shipped with the package (see DATA.md) and its modality.
EXAMPLE_NAME = "mni152_t1_brain_2mm.nii.gz"
EXAMPLE_MODALITY = "T1"


def example_path() -> Path:
    """Path of the bundled example image (``hermes/data/examples/``)."""
    return Path(str(resources.files("hermes.data").joinpath("examples", EXAMPLE_NAME)))


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _check_outdir(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse to overwrite earlier outputs without ``--force`` and never write over an input
    or into a DICOM series' own folder."""
    from hermes.data.io import image_suffix
    from hermes.inference.result import OUTPUT_FILES, TASK_FOLDERS

    names = OUTPUT_FILES + TASK_FOLDERS
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"output {out} is a broken symbolic link; remove it or choose "
                              "another -o")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    resolved = {p.resolve() for p in inputs}
    series = {p if p.is_dir() else p.parent for p in resolved
              if p.is_dir() or image_suffix(p) is None}  # DICOM inputs' folders
    if out.resolve() in series:
        raise FileExistsError(f"output folder {out} is the input DICOM series' folder: the "
                              "outputs would be added to the series; choose another -o")
    for n in names:
        if (out / n).resolve() in resolved or any(
                (out / n).resolve() in p.parents for p in resolved):
            raise FileExistsError(f"output {out / n} would overwrite the input; choose another -o")
    # checked before inference runs, not when the results are written minutes later
    base = out.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output folder {out}: {base} is not a writable "
                              "folder")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(
            f"output folder {out} already holds {', '.join(existing)}; pass --force to "
            "overwrite, --resume to continue an interrupted run, or choose another -o")


def _task_names(tasks: list[str] | None) -> list[str] | None:
    """``--tasks a,b c`` -> ``["a", "b", "c"]``."""
    if tasks is None:
        return None
    return [name for item in tasks for name in item.split(",") if name.strip()]


def _parse_postprocess(args: argparse.Namespace):
    if not args.largest_component and not args.min_volume_ml:
        return None
    return {"largest": bool(args.largest_component), "min_volume_ml": float(args.min_volume_ml)}


def _print_summary(res, written: dict, out: Path, elapsed: float) -> None:
    from hermes.inference.result import detection_note

    print(f"modality: {res.modality}{detection_note(res.detection)}")
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


def _run(args: argparse.Namespace, image: Path | list[Path], out: Path, modality: str,
         model: Any, force: bool | None = None) -> int:
    """Segment one image (a file, a DICOM folder, or one file per channel) into ``out``
    (earlier outputs there replaced when ``force``, default ``--force``)."""
    from hermes.inference.segment import MODALITY_HINT, ModalityDetectionError, segment

    images = image if isinstance(image, list) else [image]
    _check_outdir(out, args.force if force is None else force, images)
    t0 = time.perf_counter()
    shown = ", ".join(map(str, images))
    _log(args, f"hermes: segmenting {shown} ({'fast' if args.fast else 'standard'} mode)")
    try:
        res = segment(
            str(images[0]) if len(images) == 1 else [str(p) for p in images],
            tasks=_task_names(getattr(args, "tasks", None)), modality=modality, model=model,
            device=args.device, fast=args.fast, postprocess=_parse_postprocess(args),
            overlap=args.overlap, tta=args.tta,
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


def _refuse_file_output(output: str) -> None:
    """``-o`` naming an image file (``out.nii.gz``): -o is a folder."""
    from hermes.data.io import image_suffix

    if image_suffix(output) is not None:
        raise ValueError(f"-o {output} names a file: -o is the output folder (the label "
                         f"map is written to {Path(output) / 'labels.nii.gz'})")


def _cmd_segment(args: argparse.Namespace) -> int:
    _refuse_file_output(args.output)
    images = [Path(p) for p in args.input]
    for image in images:
        if not image.exists():
            raise FileNotFoundError(f"input {image} does not exist")
    if len(images) > 1:
        folders = [str(p) for p in images if p.is_dir()]
        if folders:
            raise ValueError(f"several -i inputs are the channel files of one image; "
                             f"{first_of(folders, 3)} is a folder")
    image: Path | list[Path] = images if len(images) > 1 else images[0]  # one image
    if isinstance(image, Path) and image.is_dir() and folder_cases(image, 0) is not None:
        return _run_folder(args, image, Path(args.output))
    out = Path(args.output)
    done = _finished(out, args, images) if args.resume else False
    if done is True:
        _log(args, f"hermes: {out} already holds this model's segmentation: skipped (run "
                   "without --resume to segment it again)")
        return 0
    if isinstance(done, str) and not args.force:
        raise FileExistsError(f"{done}; pass --force to overwrite it or choose another -o")
    force = args.force or (args.resume and _unfinished(out))
    return _run(args, image, out, args.modality, args.model, force)


def _unfinished(out: Path) -> bool:
    """Whether ``out`` holds a Hermes save that did not finish (its marker, no labels.json):
    ``--resume`` rewrites it; other files there still need ``--force``."""
    from hermes.inference.result import save_marker

    return save_marker(out).is_file() and not (out / "labels.json").exists()


def folder_cases(folder: Path, channels: int) -> list[tuple[str, list[Path]]] | None:
    """``(case name, image files)`` for every case of NIfTI/NRRD files directly in ``folder``
    (hidden files aside), sorted; None when the folder holds no such file or holds DICOM files
    (a DICOM series, read as one image).

    A case is named by its file without the suffix. nnU-Net channel files (``case_0000``,
    ``case_0001`` ...) are one case for a model of ``channels`` > 1 input channels (numbered
    ``_0000`` to ``_{channels-1}``, else refused naming the case); for ``channels`` 1 (0: not
    known yet) numbered files are cases of their own, ``_0000`` dropped from the name where no
    other number appears. A file without a channel number is one case (a 4-D file holds every
    channel).
    """
    from hermes.data.collection import _CHANNEL_RE
    from hermes.data.dicom import is_dicom_file
    from hermes.data.io import image_suffix, strip_image_suffix

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if image_suffix(p) is not None]
    if not images or any(is_dicom_file(p) for p in files if image_suffix(p) is None):
        return None
    stems = {p: strip_image_suffix(p.name) for p in images}
    channel = {p: _CHANNEL_RE.match(s) for p, s in stems.items()}  # nnU-Net's case_0000 names
    firsts = {m.group("case") for m in channel.values() if m and m.group("ch") == "0000"}
    if channels > 1:  # a case lacking _0000 is still one (refused below), scan_2024 is not
        firsts |= {m.group("case") for m in channel.values() if m and int(m.group("ch")) <
                   channels}
    grouped = {p for p, m in channel.items() if m and m.group("case") in firsts}
    numbered = any(channel[p].group("ch") != "0000" for p in grouped)
    named: dict[str, list[Path]] = {}
    for p, s in stems.items():
        name = channel[p].group("case") if p in grouped and (channels > 1 or not numbered) else s
        named.setdefault(name, []).append(p)
    if channels > 1:
        wrong = []
        for name, paths in named.items():
            tags = sorted(channel[p].group("ch") for p in paths if p in grouped)
            # a lone _0000 file may hold every channel (4-D): segment() checks its count
            if tags not in ([], ["0000"], [f"{i:04d}" for i in range(channels)]):
                wrong.append(f"{name} ({', '.join(tags)})")
        if wrong:
            raise ValueError(
                f"{folder}: the model takes {channels} channels, one file each numbered _0000 "
                f"to _{channels - 1:04d}; cases with other channel files: "
                f"{first_of(wrong, 3)}")
        named = {n: sorted(ps, key=lambda p: channel[p].group("ch") if p in grouped else "")
                 for n, ps in named.items()}
    twice = [f"{n} ({', '.join(p.name for p in ps)})" for n, ps in named.items()
             if len(ps) > 1 and not (channels > 1 and all(p in grouped for p in ps))]
    if twice:
        raise ValueError(f"{folder}: several files give one case name: {first_of(twice, 3)}")
    return sorted(named.items())


def _requested(args: argparse.Namespace) -> dict[str, Any]:
    """The labels.json settings this command's options give (what ``--resume`` compares)."""
    from hermes.inference.segment import window_overlap

    overlap = window_overlap(args.overlap, args.fast)
    return {"threshold": float(args.threshold), "overlap": overlap, "tta": bool(args.tta),
            "fast": bool(args.fast), "tasks_requested": _task_names(args.tasks)}


def _finished(out: Path, args: argparse.Namespace, inputs: list[Path]) -> bool | str:
    """Whether ``out`` holds a finished segmentation (its ``labels.json``, written last) of
    ``inputs`` by the model and with the settings of this command: True; False when it holds
    none; else why not (another image, another model, other settings)."""
    from hermes.inference.result import hermes_labels, input_record
    from hermes.models import checkpoint_path
    from hermes.models.default import default_model_path

    if not (out / "labels.json").exists():
        return False
    names = hermes_labels(out)
    if names is None or not names.get("model"):
        return f"{out} holds a labels.json that is not a Hermes segmentation's"
    stored_inputs = names.get("inputs")  # absent from the labels.json of older saves
    if stored_inputs is not None and stored_inputs != input_record([str(p) for p in inputs]):
        return (f"{out} holds a segmentation of another image ({names.get('source')}), or of "
                "this one before it changed")
    wanted = default_model_path() if args.model is None else checkpoint_path(args.model)
    if Path(names["model"]).resolve() != wanted.resolve():
        return f"{out} holds a segmentation by another model ({names['model']})"
    model_file = names.get("model_file")  # absent from the labels.json of older saves
    if model_file is not None and model_file != input_record([str(wanted)]):
        return f"{out} holds a segmentation by an earlier version of the model file {wanted}"
    stored = names.get("settings") or {}
    other = [f"{k} {stored[k]} (here {v})" for k, v in _requested(args).items()
             if k in stored and stored[k] != v]
    if args.modality.lower() != "auto" and str(names.get("modality", "")).lower() != \
            args.modality.lower():
        other.append(f"modality {names.get('modality')} (here {args.modality})")
    post = _parse_postprocess(args) or {"largest": False, "min_volume_ml": 0.0}
    kept = {(bool(v.get("largest")), float(v.get("min_volume_ml", 0.0)))
            for v in (stored.get("postprocess") or {}).values()} or {(False, 0.0)}
    if kept != {(post["largest"], post["min_volume_ml"])}:
        other.append("post-processing (--largest-component, --min-volume-ml)")
    if other:
        return f"{out} was segmented with other settings: {', '.join(other)}"
    wanted_files = {"structures": getattr(args, "per_structure", False),
                    "probabilities": getattr(args, "probabilities", False),
                    "preview.png": not getattr(args, "no_preview", False)}
    lacking = [name for name, want in wanted_files.items() if want and not (out / name).exists()]
    if lacking:
        return f"{out} holds a segmentation without {', '.join(lacking)}"
    return True


def _run_folder(args: argparse.Namespace, folder: Path, out: Path) -> int:
    """Segment every case of a folder into ``out/<case>/`` with the model loaded once; a case
    that fails is reported and the others still run (exit code 1 if any failed). With
    ``--resume``, cases already segmented by this model are skipped."""
    from hermes.inference.segment import _resolve_device, resolve_model

    model, _ = resolve_model(args.model, _resolve_device(args.device))
    cases = folder_cases(folder, int(model.config.in_channels)) or []
    inputs = [p for _, paths in cases for p in paths]
    force = {name: args.force for name, _ in cases}
    if args.resume:
        state = {name: _finished(out / name, args, paths) for name, paths in cases}
        done = [name for name, st in state.items() if st is True]
        if done:
            _log(args, f"hermes: {len(done)} of {len(cases)} case(s) already segmented by this "
                       f"model with these settings, skipped: {first_of(done, 5)}")
        cases = [(name, paths) for name, paths in cases if name not in done]
        for name, _ in cases:  # an unfinished case is rewritten, another run's is not
            if isinstance(state[name], str) and not args.force:
                raise FileExistsError(f"{state[name]}; pass --force to overwrite it or "
                                      "choose another -o")
            force[name] = force[name] or _unfinished(out / name)
    for name, _ in cases:  # every output folder checked before any inference runs
        _check_outdir(out / name, force[name], inputs)
    failed = []
    for i, (name, paths) in enumerate(cases, 1):
        _log(args, f"hermes: case {i} of {len(cases)}: {name}")
        try:
            _run(args, paths, out / name, args.modality, model, force[name])
        except Exception as exc:  # noqa: BLE001 - the other cases still run
            failed.append(name)
            print(f"hermes segment: error: case {name}: {exc}", file=sys.stderr)
    if failed:
        print(f"hermes segment: {len(failed)} of {len(cases)} case(s) failed: "
              f"{first_of(failed, 10)}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{len(cases)} case(s) segmented into {out}/<case>/" if cases else
              f"nothing left to segment: every case of {folder} is done in {out}/<case>/")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    image = example_path()
    if not image.is_file():
        raise FileNotFoundError(f"the bundled example {image} is missing from this installation")
    _refuse_file_output(args.output)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder; choose another -o")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"demo output folder {out} exists and is not empty; pass --force "
                              "to overwrite it or -o for another folder")
    args.tasks = None
    return _run(args, image, out, EXAMPLE_MODALITY if args.modality is None else args.modality,
                args.model)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a .hermes checkpoint, a training run's folder, or an official Hermes-R "
                        ".pth (default: the embedded model)")
    p.add_argument("--device", default="auto", type=device_option,
                   help="auto (default: CUDA when usable), cpu, cuda, cuda:1 ...")
    p.add_argument("--fast", action="store_true",
                   help="faster, slightly less accurate: window overlap 0.25 instead of 0.5 and "
                        "linear instead of cubic resampling")
    p.add_argument("--overlap", type=overlap_option, default=None, metavar="F",
                   help="sliding-window overlap in [0, 1) (default 0.5, 0.25 with --fast)")
    p.add_argument("--tta", action="store_true",
                   help="mirroring test-time augmentation over the 3 axes: 8x the inference "
                        "time (off by default, unlike nnU-Net)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="mask probability threshold (default 0.5)")
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
            parser.error(f"{option_string} given twice: one image per `hermes segment` (its "
                         "channel files after one -i; put the images in one folder and give "
                         "that folder to segment them all)")
        setattr(namespace, self.dest, values)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``demo`` to the ``hermes`` command."""
    seg = subparsers.add_parser(
        "segment", help="segment an image (NIfTI, NRRD or DICOM folder)",
        description="Segment a 3-D image; outputs lie on the input's original grid.")
    seg.add_argument("-i", "--input", required=True, action=_Once, nargs="+",
                     metavar="INPUT",
                     help="image file (.nii, .nii.gz, .nrrd, .nhdr), DICOM series folder, a "
                          "folder of image files (each case segmented into OUTPUT/<case>/, "
                          "the model loaded once; nnU-Net channel files case_0000, case_0001 "
                          "... form one case of a multi-channel model), or several files: the "
                          "channels of one image, in order")
    seg.add_argument("-o", "--output", required=True, help="output folder")
    seg.add_argument("--tasks", default=None, nargs="+", metavar="TASK",
                     help="task (or dataset-group) names, separated by commas or spaces; "
                          "default: every task of the modality (see `hermes tasks`)")
    seg.add_argument("--modality", default="auto",
                     help="CT, T1, T2, PET, CINE ... or auto (default: detected)")
    seg.add_argument("--per-structure", action="store_true",
                     help="also write one NIfTI mask per structure")
    seg.add_argument("--probabilities", action="store_true",
                     help="also write per-structure probability maps")
    seg.add_argument("--resume", action="store_true",
                     help="skip the cases (images) whose output folder holds a finished "
                          "segmentation by this model, rewrite the ones an interrupted run "
                          "left unfinished: an interrupted folder run continues")
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
