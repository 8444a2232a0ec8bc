"""Data for universal training: dataset collections, validation, preprocessing into a
memory-mapped cache, synthetic collections and a small real starter collection.

Typical use::

    import hermes.data as hd
    coll = hd.load_collection("collection.yaml")
    coll.check()                                  # raises listing every problem
    pc = hd.preprocess(coll, spacing=1.5, workers=4)   # resumable cache, hermes_cache_<yaml>/
    model = hermes.models.build("base", tasks=pc.tasks, modalities=pc.modalities,
                                groups=pc.groups)
    for case in pc.split("train"):
        case.image, case.label                    # (C, X, Y, Z), (X, Y, Z) memory maps
    img, lab = case.crop(start, (128, 128, 128))  # reads only the patch; pads outside
    targets = case.task_targets(lab)              # (T, 128, 128, 128) bool, per dataset task

Modules: ``io`` (NIfTI/NRRD readers), ``modalities``, ``labels``, ``collection``, ``splits``,
``geometry`` (reorient/crop/resample), ``normalize``, ``preprocess``, ``cache``,
``synthetic``, ``starter``, ``commands`` (CLI subcommands).
"""

from hermes.data.cache import (
    CachedCase,
    CacheMismatchError,
    DatasetInfo,
    PreprocessedCollection,
)
from hermes.data.collection import (
    Case,
    Collection,
    CollectionError,
    DatasetSpec,
    Problem,
    Task,
    load_collection,
)
from hermes.data.io import ImageReadError, load_header, load_image, save_image
from hermes.data.modalities import CANONICAL_MODALITIES, canonical_modality
from hermes.data.preprocess import PreprocessError, prepare_image, preprocess
from hermes.data.splits import SplitError, load_or_create_splits, make_splits

__all__ = [
    "CANONICAL_MODALITIES",
    "CachedCase",
    "CacheMismatchError",
    "Case",
    "Collection",
    "CollectionError",
    "DatasetInfo",
    "DatasetSpec",
    "ImageReadError",
    "PreprocessError",
    "PreprocessedCollection",
    "Problem",
    "SplitError",
    "Task",
    "canonical_modality",
    "load_collection",
    "load_header",
    "load_image",
    "load_or_create_splits",
    "make_splits",
    "prepare_image",
    "preprocess",
    "save_image",
]

