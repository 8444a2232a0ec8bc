"""Small text helpers of the error messages."""

from __future__ import annotations

from collections.abc import Sequence


def first_of(items: Sequence[str], n: int) -> str:
    """The first ``n`` of ``items`` joined by commas, with `` ...`` when there are more."""
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")
