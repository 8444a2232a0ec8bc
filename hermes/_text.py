"""Small text helpers of the error and warning messages."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def first_of(items: Sequence[str], n: int) -> str:
    """The first ``n`` of ``items`` joined by commas, with `` ...`` when there are more."""
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def command_name(args: argparse.Namespace) -> str:
    """``hermes segment``, ``hermes data validate``...: the command a parsed ``hermes`` command
    line runs, the prefix of its error and warning lines."""
    parts = (getattr(args, "command", None), getattr(args, "data_command", None))
    return " ".join(["hermes", *(p for p in parts if p)])


def positive_int(text: str) -> int:
    """argparse ``type`` of counts that must be at least 1 (cases, steps, workers...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def name_list(values: str | Sequence[str] | None) -> list[str] | None:
    """Names given separated by commas and/or spaces (``a,b c`` or several arguments) as a
    list; None stays None."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    return [n.strip() for v in items for n in v.replace(",", " ").split() if n.strip()]
