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
