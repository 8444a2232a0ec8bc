"""``hermes.models.build``: a model from a preset and task/modality names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hermes.models.config import HermesConfig, preset_config
from hermes.models.hermes_resunet import HermesResUNet
from hermes.models.vocabulary import Vocabulary


def build(
    preset: str | HermesConfig = "base",
    tasks: Sequence[str] = (),
    modalities: Sequence[str] = ("CT", "PET", "T1", "T2", "CINE"),
    in_channels: int = 1,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> HermesResUNet:
    """Build a Hermes-ResUNet.

    Args:
        preset: ``tiny``, ``small``, ``base`` or ``large`` (or a full :class:`HermesConfig`).
        tasks: task names, one prior row each (e.g. ``["liver", "bcv/spleen"]``).
        modalities: modality names, one modality-prior row each.
        in_channels: image channels.
        groups: optional dataset groups ``{name: {"tasks": [...], "modality": ...}}``.
        overrides: any :class:`HermesConfig` field (e.g. ``fusion_depths``).
    """
    if isinstance(preset, HermesConfig):
        if overrides:
            raise ValueError("give overrides through the HermesConfig itself")
        config = preset
    else:
        config = preset_config(preset, in_channels=in_channels, **overrides)
    group_specs = {k: dict(v) for k, v in (groups or {}).items()}
    vocab = Vocabulary(tasks, modalities, group_specs)  # type: ignore[arg-type]
    return HermesResUNet(config, vocab)
