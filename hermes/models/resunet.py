"""Residual U-Net backbone pieces (pre-activation residual blocks, InstanceNorm, ReLU).

Matches the official Hermes ResUNet: InstanceNorm3d (eps 1e-4, no affine) -> ReLU -> 3x3x3 conv,
twice per block; the shortcut is another norm-act-conv when the width changes; 2x max-pool going
down; trilinear upsampling (align_corners=True) to the skip's size going up, concat [skip, up].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hermes.ops.conv3d import Conv3dSame
from hermes.ops.norm import instance_norm_relu

NORM_EPS = 1e-4


class PreActConv(nn.Module):
    """InstanceNorm -> ReLU -> 3x3x3 convolution (no bias). B x Cin x D x H x W -> B x Cout x ...

    The norm (no parameters) and ReLU run fused on the CPU at inference (hermes.ops.norm).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_channels, eps=NORM_EPS)
        self.conv = Conv3dSame(in_channels, out_channels, 3)

    def activate(self, x: Tensor) -> Tensor:
        """``relu(norm(x))``, the input of the convolution."""
        return instance_norm_relu(x, NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.activate(x))


class ResidualBlock(nn.Module):
    """Two pre-activation convolutions plus a shortcut (identity, or a PreActConv when the
    width changes)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = PreActConv(in_channels, out_channels)
        self.conv2 = PreActConv(out_channels, out_channels)
        self.shortcut: nn.Module = (
            PreActConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.shortcut, PreActConv):  # both start with the same parameter-free
            a = self.conv1.activate(x)              # norm + ReLU of x: compute it once
            return self.conv2(self.conv1.conv(a)) + self.shortcut.conv(a)
        return self.conv2(self.conv1(x)) + x


def _stack(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    blocks = [ResidualBlock(in_channels, out_channels)]
    blocks += [ResidualBlock(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """3x3x3 convolution then one residual block, at full resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv3dSame(in_channels, out_channels, 3)
        self.block = ResidualBlock(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.conv(x))


class DownStage(nn.Module):
    """2x max-pool then ``count`` residual blocks (the first changes the width)."""

    def __init__(self, in_channels: int, out_channels: int, count: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(2)
        self.blocks = _stack(in_channels, out_channels, count)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(x))


class UpStage(nn.Module):
    """Upsample to the skip's size, concatenate [skip, upsampled], then residual blocks."""

    def __init__(self, in_channels: int, skip_channels: int, count: int) -> None:
        super().__init__()
        self.blocks = _stack(in_channels + skip_channels, skip_channels, count)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        # trilinear interpolation has no bfloat16 kernel on every device: upsample in float32
        up = F.interpolate(x.float(), size=skip.shape[2:], mode="trilinear", align_corners=True)
        return self.blocks(torch.cat([skip, up.to(x.dtype)], dim=1))
