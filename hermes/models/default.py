"""The embedded default model shipped inside the package (``hermes/models/data/default.hermes``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

__all__ = ["DefaultModelMissingError", "default_model", "default_model_path"]

DEFAULT_MODEL_FILE = "default.hermes"


class DefaultModelMissingError(FileNotFoundError):
    """This installation has no embedded default model file."""


def default_model_path() -> Path:
    """Where the embedded model lives in the installed package (the file may be absent)."""
    return Path(str(resources.files("hermes.models").joinpath("data", DEFAULT_MODEL_FILE)))


def default_model(map_location: str | torch.device = "cpu"):
    """Load the embedded default Hermes model (see ``hermes/models/data/MODEL_CARD.md``).

    Returns:
        :class:`hermes.models.HermesResUNet` in eval mode; its checkpoint metadata (training
        and preprocessing parameters) is available as ``model.hermes_metadata``.

    Raises:
        DefaultModelMissingError: the package was installed without the model file.
    """
    from hermes.models.checkpoint import load

    path = default_model_path()
    if not path.is_file():
        raise DefaultModelMissingError(
            f"the embedded default model is missing ({path}); this installation of hermes was "
            "built without it: reinstall hermes, or give a model explicitly "
            "(hermes.segment(..., model='model.hermes' or 'hermes_r.pth'); on the command line "
            "--model PATH)"
        )
    model = load(path, map_location=map_location)  # sets hermes_metadata
    model.hermes_source = str(path)
    return model
