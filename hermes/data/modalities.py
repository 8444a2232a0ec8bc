"""Imaging modality names: the canonical set, aliases, and user-declared extra modalities.

Hermes learns one modality prior per modality name, so names must be normalised: ``"cine MRI"``,
``"MR cine"`` and ``"CINE"`` are the same prior. The canonical set is the paper's five
modalities; a collection may declare further ones (e.g. ``modalities: [US]`` in its YAML).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["CANONICAL_MODALITIES", "DICOM_MODALITIES", "canonical_modality",
           "UnknownModalityError"]

#: The five modalities of the paper, in the order of their prior tables.
CANONICAL_MODALITIES: tuple[str, ...] = ("CT", "PET", "T1", "T2", "CINE")

#: DICOM ``Modality`` tags -> the modality they name (``MR``: any but these, see
#: ``hermes.inference.segment._tagged_modalities``).
DICOM_MODALITIES: dict[str, str] = {"CT": "CT", "PT": "PET"}

_ALIASES: dict[str, str] = {
    # CT
    "ct": "CT", "computedtomography": "CT", "cect": "CT", "ncct": "CT", "ctac": "CT",
    # PET
    "pet": "PET", "fdgpet": "PET", "petfdg": "PET", "pt": "PET", "suv": "PET",
    # T1
    "t1": "T1", "t1w": "T1", "mrt1": "T1", "t1mr": "T1", "t1mri": "T1", "mrit1": "T1",
    "t1weighted": "T1", "t1c": "T1", "t1ce": "T1", "t1gd": "T1", "t1contrast": "T1",
    "t1postcontrast": "T1", "mrt1w": "T1", "mprage": "T1",
    # T2
    "t2": "T2", "t2w": "T2", "mrt2": "T2", "t2mr": "T2", "t2mri": "T2", "mrit2": "T2",
    "t2weighted": "T2", "mrt2w": "T2",
    # cine MRI
    "cine": "CINE", "cinemri": "CINE", "cinemr": "CINE", "mrcine": "CINE", "mricine": "CINE",
    "bssfp": "CINE", "ssfp": "CINE", "cmr": "CINE", "cinecmr": "CINE",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class UnknownModalityError(ValueError):
    """A modality name is neither canonical (or an alias) nor declared by the collection."""


def canonical_modality(name: str, extra: Iterable[str] = ()) -> str:
    """Normalise a modality name.

    Args:
        name: as written by the user (``"MR T1"``, ``"cine MRI"``, ``"ct"``...).
        extra: modalities the collection declares beyond the canonical set; they are matched
            case- and punctuation-insensitively and returned in their declared spelling.

    Returns:
        The canonical name (one of :data:`CANONICAL_MODALITIES`) or the declared extra name.

    Raises:
        UnknownModalityError: naming the modality and listing the valid ones.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownModalityError(f"modality must be a non-empty string, got {name!r}")
    key = _key(name)
    if key in _ALIASES:
        return _ALIASES[key]
    for declared in extra:
        if _key(declared) == key:
            return declared.strip()
    valid = list(CANONICAL_MODALITIES) + [e for e in extra]
    raise UnknownModalityError(
        f"unknown modality {name!r}; valid: {', '.join(valid)} (aliases such as 'MR T1', "
        "'cine MRI' are accepted; declare a new modality in the collection's top-level "
        "'modalities:' list)"
    )
