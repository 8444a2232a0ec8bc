"""The ``hermes`` command."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from hermes._text import command_name

Handler = Callable[[argparse.Namespace], int]


def _cmd_info(args: argparse.Namespace) -> int:
    from hermes.info import main as info_main

    return info_main(["--json"] if args.json else [])


def _cmd_tasks(args: argparse.Namespace) -> int:
    import hermes.models as hm
    from hermes.models.default import default_model_path

    model = args.model
    if model is None and default_model_path().is_file():
        model = str(default_model_path())
    branches: list[int] = []
    channels = 1  # the official model's, and the default
    if model is None or model == "official":
        vocab = hm.official_vocabulary()
        source = "official Hermes-R index tables"
    elif hm.checkpoint_path(model).is_file() and not hm.is_hermes_checkpoint(model):  # .pth
        vocab = hm.from_official(model).vocab
        source = f"{model} (official weights)"
    else:
        header = hm.read_header(model)
        vocab = hm.Vocabulary.from_dict(header["vocab"])
        branches = list(header["config"].get("decoder_branches", []))
        channels = int(header["config"].get("in_channels", 1))
        source = model

    def where(name: str) -> str:  # tasks added with their own decoder (finetune --new-decoder)
        k = sum(vocab.task_index(name) >= first for first in branches)
        return f"  (decoder branch {k - 1})" if k else ""
    print(f"{source}: {len(vocab.usable_tasks())} tasks, modalities {', '.join(vocab.modalities)}"
          + (f"; {channels} input channels (an image's channels in training order)"
             if channels > 1 else ""))
    grouped = set()
    groups = sorted(vocab.groups.items(), key=lambda g: vocab.task_index(g[1]["tasks"][0]))
    for group, spec in groups:
        modality = spec.get("modality", "")
        print(f"\n[{group}]" + (f" ({modality})" if modality else ""))
        for name in spec["tasks"]:
            print(f"  {vocab.task_index(name):3d}  {name}{where(name)}")
            grouped.add(name)
    rest = [t for t in vocab.usable_tasks() if t not in grouped]
    if rest:
        print("\n[tasks]")
        for name in rest:
            print(f"  {vocab.task_index(name):3d}  {name}{where(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hermes", description="Universal 3D medical image segmentation with context priors."
    )
    from hermes import __version__

    parser.add_argument("--version", action="version", version=f"hermes {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="what this installation can run (extension, OpenMP, CUDA)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_cmd_info)
    tasks = sub.add_parser("tasks", help="list a model's tasks and modalities")
    tasks.add_argument("model", nargs="?",
                       help="checkpoint path, or 'official' (default: the embedded model)")
    tasks.set_defaults(handler=_cmd_tasks)

    from hermes.data.commands import register as register_data
    from hermes.inference.commands import register as register_inference
    from hermes.training.commands import register as register_training
    from hermes.training.finetune_commands import register as register_finetune

    register_data(sub)
    register_training(sub)
    register_finetune(sub)
    register_inference(sub)
    return parser


_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def _warning_format(command: str, default: Callable) -> Callable:
    """``warnings.formatwarning`` for a command: Hermes' own warnings as one line
    ``hermes COMMAND: warning: ...`` (no source line; the category named unless it is a
    UserWarning), other libraries' as Python prints them."""

    def fmt(message, category, filename, lineno, line=None):  # noqa: ANN001
        if not str(filename).startswith(_PACKAGE_DIR):
            return default(message, category, filename, lineno, line)
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"{command}: warning{kind}: {message}\n"

    return fmt


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser imports torch (a second or two): Ctrl-C there is no traceback
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("hermes: interrupted", file=sys.stderr)
        return 130
    default = warnings.formatwarning
    warnings.formatwarning = _warning_format(command_name(args), default)
    try:
        return _run(parser, args)
    finally:
        warnings.formatwarning = default


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    handler: Handler | None = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # once, not per torchrun process
            print("hermes: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except Exception as exc:  # one-line reason, non-zero exit
        if not getattr(exc, "reported_elsewhere", False):  # (another process printed it)
            print(f"{command_name(args)}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
