"""Label maps: parsing user/dataset.json label definitions and naming tasks.

A dataset's label files hold the dataset's own integers (0 = background). A *label map* says
which integer value(s) make up each named structure: ``{1: liver, 2: tumour}`` (MSD style,
value -> name), ``{liver: 1, tumour: 2}`` (nnU-Net v2 style, name -> value) or
``{kidney: [1, 2]}`` (a structure that is the union of several values, like nnU-Net regions).

A task's *global* name is ``"<dataset>/<name>"`` unless the structure is declared shared, in
which case it is the bare shared name and the same prior is used by every dataset that has it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LabelMapError", "parse_label_map", "background_name", "BACKGROUND_NAMES"]

BACKGROUND_NAMES = frozenset({"background", "bg", "clear label", "unlabeled", "unlabelled"})


class LabelMapError(ValueError):
    """A label map cannot be interpreted; the message says which entry and why."""


def _as_int(v: object, what: str) -> int:
    if isinstance(v, bool):
        raise LabelMapError(f"{what}: {v!r} is not an integer label value")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    raise LabelMapError(f"{what}: {v!r} is not an integer label value")


def _is_int_like(v: object) -> bool:
    try:
        _as_int(v, "")
        return True
    except LabelMapError:
        return False


def background_name(raw: Any) -> str | None:
    """The name a ``{value: name}`` label map gives value 0 (None: none, or the other
    orientation, where a name on 0 is an error of :func:`parse_label_map`)."""
    if not isinstance(raw, Mapping) or not all(_is_int_like(k) for k in raw):
        return None
    for k, name in raw.items():
        if int(k) == 0 and isinstance(name, str):
            return name
    return None


def parse_label_map(raw: Mapping) -> dict[str, tuple[int, ...]]:
    """Interpret a label map in either orientation.

    Args:
        raw: ``{value: name}`` (keys integers or digit strings, MSD ``dataset.json`` style) or
            ``{name: value | [values]}`` (nnU-Net v2 style). Background (value 0, or a name such
            as ``"background"``) is dropped.

    Returns:
        ``{name: (values...)}`` in order of each name's smallest value; several values with the
        same name are merged into one structure.

    Raises:
        LabelMapError: mixed orientations, non-integer values, negative values, a structure
            using value 0, or one value given two different names.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise LabelMapError(f"label map must be a non-empty mapping, got {raw!r}")
    keys_int = [_is_int_like(k) for k in raw]
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    if all(keys_int):
        for k, name in raw.items():
            value = _as_int(k, "label map key")
            if not isinstance(name, str) or not name.strip():
                raise LabelMapError(f"label value {value}: name must be a non-empty string")
            name = name.strip()
            if value == 0:
                continue  # background, whatever it is called
            if name.lower() in BACKGROUND_NAMES:
                raise LabelMapError(f"label value {value} is named {name!r} but is not 0")
            out.setdefault(name, []).append(value)
    elif not any(keys_int):
        for name, values in raw.items():
            name = str(name).strip()
            vals = values if isinstance(values, (list, tuple)) else [values]
            ints = [_as_int(v, f"label {name!r}") for v in vals]
            if name.lower() in BACKGROUND_NAMES:
                if ints != [0]:
                    raise LabelMapError(f"background must be value 0, got {ints}")
                continue
            if 0 in ints:
                raise LabelMapError(f"label {name!r} uses value 0, which is background")
            if not ints:
                raise LabelMapError(f"label {name!r} has no values")
            out.setdefault(name, []).extend(ints)
    else:
        raise LabelMapError(
            "label map mixes 'value: name' and 'name: value' entries; use one orientation"
        )
    for name, vals in out.items():
        for v in vals:
            if v < 0:
                raise LabelMapError(f"label {name!r}: negative value {v}")
            # A value may belong to several structures only in name->values maps (regions).
            if all(keys_int) and v in owner and owner[v] != name:
                raise LabelMapError(f"label value {v} named both {owner[v]!r} and {name!r}")
            owner.setdefault(v, name)
    if not out:
        raise LabelMapError("label map defines no foreground structure")
    ordered = sorted(out.items(), key=lambda kv: min(kv[1]))
    return {name: tuple(sorted(set(vals))) for name, vals in ordered}
