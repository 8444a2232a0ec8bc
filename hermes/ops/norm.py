"""Instance normalisation followed by ReLU, fused on the CPU for inference.

The backbone's pre-activation convolutions start with ``relu(instance_norm(x))`` (no affine,
biased variance). PyTorch computes it as a batch norm over a reshaped tensor and then a separate
ReLU: five passes over the activation and two fresh outputs. The native kernel reads the input
twice (statistics, then normalise + ReLU) and writes one output.

The fused kernel runs for contiguous-able float32 CPU tensors when no gradient is needed
(inference); training, other dtypes and devices use the PyTorch reference. ``HERMES_FUSED_NORM=0``
forces the reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from hermes.ops._extension import extension, extension_loaded

__all__ = ["instance_norm_relu", "instance_norm_relu_reference"]


def instance_norm_relu_reference(x: Tensor, eps: float, relu: bool = True) -> Tensor:
    """PyTorch: ``relu(instance_norm(x, eps))`` for ``B x C x spatial...``."""
    y = F.instance_norm(x, eps=eps)
    return F.relu(y) if relu else y


def _use_native(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
        and os.environ.get("HERMES_FUSED_NORM", "1") != "0"
        and extension_loaded()
        and hasattr(extension(), "instance_norm_act_cpu")
    )


def instance_norm_relu(x: Tensor, eps: float, relu: bool = True) -> Tensor:
    """``relu(instance_norm(x, eps))`` (or without the ReLU), normalising each (sample, channel)
    over its spatial voxels.

    Args:
        x: ``B x C x spatial...`` with at least two spatial voxels.
        eps: added to the (biased) variance.
    Returns:
        a new tensor of ``x``'s shape.
    """
    if x.dim() < 3:
        raise ValueError(f"instance norm needs B x C x spatial..., got shape {tuple(x.shape)}")
    if not _use_native(x):
        return instance_norm_relu_reference(x, eps, relu)
    size = x[0, 0].numel()
    if size < 2:
        raise ValueError(f"instance norm needs more than one spatial voxel, got {tuple(x.shape)}")
    src = x.contiguous()
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    extension().instance_norm_act_cpu(src.data_ptr(), out.data_ptr(), x.shape[0] * x.shape[1],
                                      size, float(eps), bool(relu))
    return out
