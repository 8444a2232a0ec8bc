"""Train/validation/test splits: made once (seeded), stored as JSON, reused afterwards.

Each dataset is split on its own: predefined test cases (dataset.json ``test`` entries with
labels, or the YAML's ``test_cases``) go to ``test``; the rest are shuffled with a generator
seeded by ``(seed, dataset name)`` and ``val_fraction`` of them go to ``val``. The stored file is
authoritative: adding a *new dataset* to the collection splits only that dataset; changing the
cases of an already split dataset, or declaring one of them a test case, is an error (delete its
entry, or the file, to re-split).
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from hermes.data.collection import Collection, DatasetSpec
from hermes.files import atomic_write_json

__all__ = ["SplitError", "split_dataset", "make_splits", "load_or_create_splits"]

SPLIT_NAMES = ("train", "val", "test")


class SplitError(ValueError):
    """A stored split no longer matches the collection."""


def split_dataset(ds: DatasetSpec, seed: int, val_fraction: float) -> dict[str, list[str]]:
    """Split one dataset's case ids into ``{"train", "val", "test"}`` (sorted lists).

    With ``n`` non-test cases, ``round(val_fraction * n)`` go to val, at least one when
    ``n >= 2`` and ``val_fraction > 0``, and at least one case always stays in train.
    """
    test = sorted(c.case_id for c in ds.cases if c.predefined_split == "test")
    rest = sorted(c.case_id for c in ds.cases if c.predefined_split != "test")
    rng = np.random.default_rng([seed, zlib.crc32(ds.name.encode())])
    order = [rest[i] for i in rng.permutation(len(rest))]
    n = len(order)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, n - 1))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val]), "test": test}


def make_splits(collection: Collection, seed: int | None = None,
                val_fraction: float | None = None) -> dict:
    """Fresh splits for every dataset (nothing is written)."""
    seed = collection.split_seed if seed is None else seed
    vf = collection.val_fraction if val_fraction is None else val_fraction
    return {
        "version": 1,
        "seed": seed,
        "val_fraction": vf,
        "datasets": {ds.name: split_dataset(ds, seed, vf) for ds in collection.datasets},
    }


def _warn_other_settings(path: Path, splits: dict, seed: int, val_fraction: float) -> None:
    """Warn when the stored splits were made with another seed or validation fraction than the
    one asked for now (the stored file stays authoritative)."""
    old = (splits.get("seed"), splits.get("val_fraction"))
    try:
        same = int(old[0]) == int(seed) and abs(float(old[1]) - float(val_fraction)) <= 1e-12
    except (TypeError, ValueError):  # a hand-written file without them (or not numbers)
        return
    if not same:
        warnings.warn(f"{path} was made with splits seed {old[0]}, val_fraction {old[1]}; the "
                      f"collection now asks for seed {seed}, val_fraction {val_fraction}. The "
                      "stored splits are kept: delete that file to split again.", stacklevel=3)


def load_or_create_splits(collection: Collection, path: str | os.PathLike,
                          seed: int | None = None, val_fraction: float | None = None) -> dict:
    """Read the splits at ``path``, creating (and writing) them if absent.

    Datasets missing from the stored file are split with the stored seed and added.

    Raises:
        SplitError: a stored dataset's case ids differ from the collection's (names the
            dataset and the differing cases).
    """
    path = Path(path)
    if not path.is_file():
        splits = make_splits(collection, seed, val_fraction)
        atomic_write_json(path, splits)
        return splits
    try:
        splits = json.loads(path.read_text())
        stored = splits["datasets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SplitError(f"{path}: not a valid splits file ({exc})") from exc
    _warn_other_settings(path, splits, collection.split_seed if seed is None else seed,
                         collection.val_fraction if val_fraction is None else val_fraction)
    changed = False
    errors = []
    for ds in collection.datasets:
        if ds.name not in stored:
            stored[ds.name] = split_dataset(ds, int(splits.get("seed", 0)),
                                            float(splits.get("val_fraction", 0.2)))
            changed = True
            continue
        have = {c for s in SPLIT_NAMES for c in stored[ds.name].get(s, [])}
        now = {c.case_id for c in ds.cases}
        if have != now:
            added, gone = sorted(now - have), sorted(have - now)
            errors.append(f"dataset {ds.name!r}: cases added {added[:5]}, removed {gone[:5]}"
                          f"{' ...' if len(added) > 5 or len(gone) > 5 else ''}")
            continue
        # a case declared test (test_cases, dataset.json "test") after the split would
        # otherwise stay in train or val; the stored test split may hold more (edited by hand)
        declared = {c.case_id for c in ds.cases if c.predefined_split == "test"}
        leaked = sorted(declared - set(stored[ds.name].get("test", [])))
        if leaked:
            errors.append(f"dataset {ds.name!r}: cases declared test {leaked[:5]} are not in "
                          "the stored test split")
    if errors:
        raise SplitError(f"stored splits {path} do not match the collection: "
                         + "; ".join(errors) + ". Delete that dataset's entry (or the file) "
                         "to split it again.")
    if changed:
        atomic_write_json(path, splits)
    return splits
