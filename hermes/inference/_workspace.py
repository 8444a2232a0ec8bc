"""Reusable zero-filled float32 buffers for the aggregation accumulators.

Freshly allocated host memory is filled at page-fault speed (several times slower than reused
memory), so accumulators are taken from here and handed back zeroed. Invariant: every buffer in
the cache is entirely zero. A buffer that was not handed back (e.g. after an exception) is simply
dropped. At most ``_MAX_PER_DEVICE`` buffers and ``HERMES_WORKSPACE_BYTES`` bytes (default 2 GiB)
stay cached per device, so one large volume does not pin gigabytes after the call; a larger
buffer is freed when handed back.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

__all__ = ["acquire", "release", "clear_workspace", "cached_bytes"]

_MAX_PER_DEVICE = 2


def _byte_budget(default: int = 2 << 30) -> int:
    """``HERMES_WORKSPACE_BYTES`` (a number of bytes, e.g. ``4e9``), else ``default``."""
    raw = os.environ.get("HERMES_WORKSPACE_BYTES")
    if raw is None:
        return default
    try:
        return max(0, int(float(raw)))
    except ValueError:
        warnings.warn(
            f"HERMES_WORKSPACE_BYTES={raw!r} is not a number of bytes; using {default}",
            stacklevel=2,
        )
        return default


_MAX_BYTES = _byte_budget()
_lock = threading.Lock()
_cache: dict[str, list[torch.Tensor]] = {}


def acquire(numel: int, device: torch.device, reuse: bool = True) -> torch.Tensor:
    """A zero-filled contiguous float32 tensor of ``numel`` elements on ``device``.

    The result is a view of a cached buffer when one is large enough (``reuse``), else new.
    """
    if reuse:
        with _lock:
            bucket = _cache.get(str(device), [])
            fitting = [i for i, b in enumerate(bucket) if b.numel() >= numel]
            if fitting:
                best = min(fitting, key=lambda i: bucket[i].numel())
                return bucket.pop(best)[:numel]
    # a normal tensor even under torch.inference_mode(), so that a later call outside that mode
    # may still update the cached buffer in place
    with torch.inference_mode(False):
        return torch.zeros(numel, dtype=torch.float32, device=device)


def release(buffer: torch.Tensor, reuse: bool = True) -> None:
    """Hands back a buffer from ``acquire``; the caller guarantees it is all zero again."""
    if not reuse:
        return
    base = buffer._base if buffer._base is not None else buffer
    with _lock:
        bucket = _cache.setdefault(str(base.device), [])
        if any(b.data_ptr() == base.data_ptr() for b in bucket):
            return
        # the buffer handed back first (the likeliest to be asked for again), then the largest
        # cached ones that still fit in the byte budget
        kept: list[torch.Tensor] = []
        total = 0
        for b in [base, *sorted(bucket, key=lambda b: -b.numel())]:
            if len(kept) < _MAX_PER_DEVICE and total + 4 * b.numel() <= _MAX_BYTES:
                kept.append(b)
                total += 4 * b.numel()
        bucket[:] = sorted(kept, key=lambda b: -b.numel())


def clear_workspace() -> None:
    """Frees all cached accumulator buffers."""
    with _lock:
        _cache.clear()


def cached_bytes() -> int:
    """Bytes currently held by the cache."""
    with _lock:
        return sum(b.numel() * 4 for bucket in _cache.values() for b in bucket)
