"""Hermes models: ResUNet backbone, context priors, heads, presets and checkpoints."""

from hermes.models.build import build
from hermes.models.checkpoint import (
    CheckpointError,
    checkpoint_path,
    is_hermes_checkpoint,
    load,
    read_header,
    save,
)
from hermes.models.config import PRESETS, HermesConfig, preset_config
from hermes.models.hermes_resunet import HermesOutput, HermesResUNet
from hermes.models.official import from_official, load_model_file
from hermes.models.vocabulary import UnknownNameError, Vocabulary, official_vocabulary

__all__ = [
    "PRESETS",
    "CheckpointError",
    "HermesConfig",
    "HermesOutput",
    "HermesResUNet",
    "UnknownNameError",
    "Vocabulary",
    "build",
    "checkpoint_path",
    "from_official",
    "is_hermes_checkpoint",
    "load",
    "load_model_file",
    "official_vocabulary",
    "preset_config",
    "read_header",
    "save",
]
