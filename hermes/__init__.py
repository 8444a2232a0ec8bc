"""Hermes: universal 3D medical image segmentation with context priors.

One model, trained jointly on many partially labelled datasets across CT, MRI and PET,
that segments any structure it has learned when told the image's modality (or detects it).
"""

from hermes._version import __version__

__all__ = ["__version__", "segment"]


#: Subpackages reachable as attributes after a plain ``import hermes`` (``hermes.ops...``).
_SUBPACKAGES = ("analysis", "data", "inference", "models", "ops", "training")


def __getattr__(name: str):
    # lazy: ``import hermes`` stays light (no torch import until segment is used)
    if name == "segment":
        from hermes.inference.segment import segment

        return segment
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"hermes.{name}")
    raise AttributeError(f"module 'hermes' has no attribute {name!r}")
