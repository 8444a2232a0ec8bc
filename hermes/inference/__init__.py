"""Whole-volume inference: sliding windows with native, memory-bounded patch aggregation.

Drop-in for MONAI (same arguments, same float result)::

    from hermes.inference import sliding_window_inference
    logits = sliding_window_inference(image, (96, 96, 96), 4, model, overlap=0.5, mode="gaussian")

Reduced outputs in the same pass, with accumulators for one window-deep slab only::

    labels = sliding_window_inference(image, 96, 4, model, overlap=0.5, mode="gaussian",
                                      output="labels", threshold=0.5, streaming=True)

Custom loops: :class:`PatchAggregator` (``add_batch(patches, locations)``, ``finalize()``).
"""

from hermes.inference._workspace import clear_workspace
from hermes.inference.aggregator import OUTPUT_KINDS, PatchAggregator, best_stream_axis
from hermes.inference.sliding_window import extract_logits, sliding_window_inference, window_starts

__all__ = [
    "OUTPUT_KINDS",
    "PatchAggregator",
    "best_stream_axis",
    "clear_workspace",
    "extract_logits",
    "sliding_window_inference",
    "window_starts",
]
