"""Whole-volume inference: sliding windows with native, memory-bounded patch aggregation."""

from hermes.inference._workspace import clear_workspace
from hermes.inference.aggregator import OUTPUT_KINDS, PatchAggregator
from hermes.inference.sliding_window import extract_logits, sliding_window_inference, window_starts

__all__ = [
    "OUTPUT_KINDS",
    "PatchAggregator",
    "clear_workspace",
    "extract_logits",
    "sliding_window_inference",
    "window_starts",
]
