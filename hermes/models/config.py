"""Architecture configuration of a Hermes-ResUNet and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class HermesConfig:
    """Hyper-parameters of a Hermes-ResUNet.

    Stage widths are ``base_width * width_multipliers`` (official: b, 2b, 4b, 8b, 10b). Prior
    fusion happens after encoder stages 2, 3, 4 and decoder stages 1, 2 with ``fusion_depths``
    attention blocks each. ``null_tokens`` trailing null task tokens are appended when tasks are
    given by name (the official training and evaluation always carried one).

    ``decoder_branches`` (incremental learning, :func:`hermes.models.extend.add_decoder_branch`):
    ascending first task indices of extra decoders; the tasks from ``decoder_branches[k]`` up to
    the next entry are segmented by branch ``k`` (its own decoder stages, decoder fusion layers
    and task head on the shared encoder), all lower ones by the main decoder.
    """

    in_channels: int = 1
    base_width: int = 32
    width_multipliers: tuple[int, ...] = (1, 2, 4, 8, 10)
    num_blocks: tuple[int, ...] = (2, 2, 2, 2)
    fusion_depths: tuple[int, ...] = (2, 2, 4, 2, 2)
    modality_tokens: int = 10
    head_dim: int = 32
    null_tokens: int = 1
    decoder_branches: tuple[int, ...] = ()
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.width_multipliers = tuple(int(v) for v in self.width_multipliers)
        self.num_blocks = tuple(int(v) for v in self.num_blocks)
        self.fusion_depths = tuple(int(v) for v in self.fusion_depths)
        self.decoder_branches = tuple(int(v) for v in self.decoder_branches)
        if len(self.width_multipliers) != 5:
            raise ValueError("width_multipliers needs 5 entries (stem and four down stages)")
        if len(self.num_blocks) != 4 or min(self.num_blocks) < 1:
            raise ValueError("num_blocks needs 4 positive entries")
        if len(self.fusion_depths) != 5 or min(self.fusion_depths) < 1:
            raise ValueError("fusion_depths needs 5 positive entries")
        if self.in_channels < 1 or self.base_width < 1 or self.modality_tokens < 1:
            raise ValueError("in_channels, base_width and modality_tokens must be positive")
        b = self.decoder_branches
        if b and (b[0] < 1 or any(x >= y for x, y in zip(b, b[1:], strict=False))):
            raise ValueError(f"decoder_branches must be ascending task indices >= 1, got {b}")
        if self.null_tokens < 0:
            raise ValueError("null_tokens must be >= 0")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        for level in self.fusion_widths:
            if level < self.head_dim:
                raise ValueError(
                    f"fusion width {level} < head width {self.head_dim}: raise base_width"
                )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel widths of the stem and the four down stages."""
        return tuple(self.base_width * m for m in self.width_multipliers)

    @property
    def fusion_widths(self) -> tuple[int, ...]:
        """Widths at the five fusion levels: enc2, enc3, bottleneck, dec1, dec2."""
        w = self.widths
        return (w[2], w[3], w[4], w[3], w[2])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("width_multipliers", "num_blocks", "fusion_depths", "decoder_branches"):
            d[key] = list(d[key])
        if not d["decoder_branches"]:  # readable by versions without branches
            del d["decoder_branches"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HermesConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture config keys {unknown}")
        return cls(**data)


# Backbone parameter counts (convolutions only; InstanceNorm has no affine weights):
# tiny 1.61M, small 10.14M, base 40.56M, large 162.24M (the official formula at width 64; the
# paper's 157.9M is not reached by any clean configuration, see README).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"base_width": 8, "num_blocks": (1, 1, 1, 1), "fusion_depths": (1, 1, 1, 1, 1)},
    "small": {"base_width": 16},
    "base": {"base_width": 32},
    "large": {"base_width": 64},
}


def preset_config(name: str, **overrides: Any) -> HermesConfig:
    """Config of preset ``name`` (tiny, small, base, large) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    values.setdefault("preset", name)
    return HermesConfig(**values)
