"""Per-modality intensity normalisation (clip, then z-score), as in the Hermes recipe.

- CT: clip Hounsfield units to a fixed window (default [-1000, 1000] HU, keeping air, lung,
  soft tissue and bone distinguishable across body regions), then z-score with the mean and
  standard deviation of the clipped voxels inside the body (HU above ``body_threshold``).
- MRI (T1, T2, CINE), PET and user-declared modalities: clip to the 0.5 / 99.5 percentiles of
  the non-zero voxels, then z-score with the non-zero voxels' mean and standard deviation. A
  ``clip`` override gives them a fixed window instead (kind ``"window"``), still z-scored over
  the non-zero voxels.

Statistics are per image (per channel). Settings can be overridden per modality in the
collection YAML, e.g. ``normalization: {CT: {clip: [-200, 300]}, T2: {percentiles: [1, 99]}}``
(keys are modality names or their aliases, e.g. ``T1w``). A list gives each channel of that
modality's images its own: ``normalization: {PET: [CT, PET]}`` normalises channel 0 of PET
images as CT (HU window) and channel 1 as PET (a PET/CT dataset such as AutoPET); an entry is
a modality name or a mapping of overrides of the modality's own default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["NormalizationSpec", "default_normalization", "normalization_for", "normalize",
           "spec_dict"]


@dataclass(frozen=True)
class NormalizationSpec:
    """How to normalise one modality.

    ``kind``: ``"ct"`` (fixed clip window in ``clip``; statistics over the body, raw values
    above ``body_threshold``), ``"window"`` (fixed ``clip`` window; statistics over the non-zero
    voxels), ``"percentile"`` (clip to ``percentiles`` of the non-zero voxels) or ``"none"``.
    """

    kind: str = "percentile"
    clip: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    body_threshold: float = -500.0

    def to_dict(self) -> dict:
        return asdict(self)


KINDS = ("ct", "window", "percentile", "none")


def _same_modality(key: object, modality: str) -> bool:
    """Whether a ``normalization:`` key names ``modality`` (aliases such as ``T1w`` count)."""
    from hermes.data.modalities import UnknownModalityError, canonical_modality

    try:
        return canonical_modality(str(key)) == canonical_modality(modality)
    except UnknownModalityError:  # a modality the collection declares itself
        return str(key).strip().upper() == modality.strip().upper()


def default_normalization(modality: str) -> NormalizationSpec:
    """CT: HU window; everything else (MRI, PET, new modalities): percentile clipping."""
    return NormalizationSpec("ct") if modality == "CT" else NormalizationSpec("percentile")


#: One spec for every channel, or one per channel.
Specs = NormalizationSpec | tuple[NormalizationSpec, ...]


def _override(modality: str, overrides: Mapping | None) -> object:
    o = None
    for k, v in (overrides or {}).items():
        if _same_modality(k, modality):
            o = v
    return o


def normalization_for(modality: str, overrides: Mapping | None = None) -> Specs:
    """The spec for ``modality``, with YAML ``normalization:`` overrides applied: one, or one
    per channel where the override is a list (see the module's docstring).

    Raises:
        ValueError: malformed override (names the modality and the bad key).
    """
    o = _override(modality, overrides)
    if isinstance(o, list | tuple):
        if not o:
            raise ValueError(f"normalization for {modality}: an empty channel list")
        specs = []
        for i, entry in enumerate(o):
            if isinstance(entry, str):  # a modality's normalisation (its own overrides too)
                from hermes.data.modalities import UnknownModalityError, canonical_modality

                try:
                    name = canonical_modality(entry)
                except UnknownModalityError:
                    name = entry.strip()
                own = _override(name, overrides)
                specs.append(_apply(name, default_normalization(name),
                                    own if isinstance(own, Mapping) else None))
            elif isinstance(entry, Mapping):
                specs.append(_apply(modality, default_normalization(modality), entry))
            else:
                raise ValueError(f"normalization for {modality}, channel {i}: expected a "
                                 f"modality name or a mapping, got {entry!r}")
        return tuple(specs)
    return _apply(modality, default_normalization(modality), o)


def spec_dict(spec: Specs) -> dict | list[dict]:
    """``spec.to_dict()``, or the list of the channels' dicts."""
    return [s.to_dict() for s in spec] if isinstance(spec, tuple) else spec.to_dict()


def _apply(modality: str, spec: NormalizationSpec, o: object) -> NormalizationSpec:
    """``spec`` with the override mapping ``o`` applied (None: unchanged)."""
    if o is None:
        return spec
    if not isinstance(o, Mapping):
        raise ValueError(f"normalization for {modality}: expected a mapping or a list of "
                         f"channels, got {o!r}")
    kw = asdict(spec)
    for key, val in o.items():
        if key == "clip":
            fixed = "ct" if spec.kind == "ct" else "window"
            kw["kind"] = fixed if o.get("kind") is None else o["kind"]
            kw["clip"] = tuple(float(x) for x in val)
        elif key == "percentiles":
            kw["kind"] = "percentile" if o.get("kind") is None else o["kind"]
            kw["percentiles"] = tuple(float(x) for x in val)
        elif key in ("kind", "body_threshold"):
            kw[key] = val if key == "kind" else float(val)
        else:
            raise ValueError(f"normalization for {modality}: unknown key {key!r}")
    if kw["kind"] not in KINDS:
        raise ValueError(f"normalization for {modality}: unknown kind {kw['kind']!r}")
    for pair in ("clip", "percentiles"):
        if len(kw[pair]) != 2 or kw[pair][0] >= kw[pair][1]:
            raise ValueError(f"normalization for {modality}: {pair} must be [low, high]")
    return NormalizationSpec(**kw)


#: Voxels per slab of the float64 statistics in :func:`_zscore_` (8 MiB of float64 each).
_STATS_SLAB = 1 << 20


def _zscore_(x: np.ndarray, sel: np.ndarray | None) -> tuple[float, float]:
    """Z-score ``x`` in place with the mean and standard deviation of ``x[sel]`` (all of ``x``
    when ``sel`` is None or selects nothing); returns them. The float64 sums run over slabs of
    ``_STATS_SLAB`` voxels, so no float64 copy of the volume is made."""
    flat = x.reshape(-1)
    keep = sel.reshape(-1) if sel is not None and sel.any() else None
    slabs = [slice(i, i + _STATS_SLAB) for i in range(0, flat.size, _STATS_SLAB)]

    def values(sl: slice) -> np.ndarray:
        v = flat[sl] if keep is None else flat[sl][keep[sl]]
        return v.astype(np.float64)

    count = flat.size if keep is None else int(np.count_nonzero(keep))
    if count == 0:  # an empty volume: nothing to normalise
        return 0.0, 1.0
    mean = sum(float(values(sl).sum()) for sl in slabs) / count
    var = sum(float(np.square(values(sl) - mean).sum()) for sl in slabs) / count
    std = float(np.sqrt(var))
    std = std if std > 1e-8 else 1.0
    x -= np.float32(mean)
    x /= np.float32(std)
    return mean, std


def normalize(image: np.ndarray, spec: Specs) -> tuple[np.ndarray, list[dict]]:
    """Normalise a ``(C, X, Y, Z)`` image per channel (``image`` is not modified); ``spec``:
    one for every channel, or one per channel.

    Works in the returned array: besides it, one boolean voxel mask per channel (and, for
    percentile clipping, the channel's non-zero values) are the only temporaries.

    Returns:
        ``(float32 image, per-channel stats)``: each stats dict holds the clip range used and
        the mean/std subtracted/divided, so the transform is recorded and invertible.
    """
    specs = spec if isinstance(spec, tuple) else (spec,) * image.shape[0]
    if len(specs) != image.shape[0]:
        raise ValueError(f"the normalisation gives {len(specs)} channels their own settings, "
                         f"the image has {image.shape[0]} channels")
    out = np.empty(image.shape, np.float32)
    stats = []
    for c, spec in enumerate(specs):
        x = out[c]
        x[...] = image[c]
        if spec.kind == "none":
            stats.append({"clip": None, "mean": 0.0, "std": 1.0})
            continue
        if spec.kind in ("ct", "window"):
            # CT: the body in raw HU (a narrow window must not make air body); else non-zero
            sel = x > spec.body_threshold if spec.kind == "ct" else x != 0
            lo, hi = spec.clip
        else:
            sel = x != 0
            vals = x[sel] if sel.any() else x.ravel().copy()
            lo, hi = (float(v) for v in np.percentile(vals, spec.percentiles,
                                                      overwrite_input=True))
            del vals
        np.clip(x, lo, hi, out=x)
        mean, std = _zscore_(x, sel)
        stats.append({"clip": [float(lo), float(hi)], "mean": mean, "std": std})
    return out, stats
