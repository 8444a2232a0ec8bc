"""3x3x3 convolution with a fast weight gradient on CPU.

PyTorch's CPU backward for the weight of a 3-D convolution with few channels is ~25x slower than
its forward (4.0 s versus 0.16 s for 2 x 8 x 48^3 on our 2-core machine), which made CPU training
crawl. The weight gradient of a stride-1 convolution is itself a convolution, of the input by the
output gradient with batch and channel axes swapped::

    dW[o, i, k] = sum_{b, p} g[b, o, p] x[b, i, p + k]  =  conv3d(x^T, g^T)[i, o, k]

which runs at forward speed. On CUDA (cuDNN is fast) the standard path is used.

The forward itself goes straight to oneDNN (``torch.mkldnn_convolution``) for float32 CPU
tensors: PyTorch sends batch-1 convolutions of small feature maps (batch x channels x depth x
height <= 20480) to its generic ``slow_conv3d`` instead, e.g. 53 ms instead of 4 ms for 16
channels at 32^3 on our 2-core machine, which was 43 % of the embedded model's 64^3 forward.
``HERMES_ONEDNN_CONV=0`` restores PyTorch's choice, as does tracing by ``torch.compile``
(dynamo cannot trace ``mkldnn_convolution``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _use_onednn(x: Tensor, w: Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()  # dynamo cannot trace mkldnn_convolution
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and os.environ.get("HERMES_ONEDNN_CONV", "1") != "0"
    )


def _forward(x: Tensor, w: Tensor, padding: tuple[int, int, int]) -> Tensor:
    """The convolution without autograd tracking (callers make sure none is needed)."""
    if _use_onednn(x, w):
        return torch.mkldnn_convolution(x.contiguous(), w.contiguous(), None, padding,
                                        (1, 1, 1), (1, 1, 1), 1)
    return F.conv3d(x, w, padding=padding)


class _Conv3dSame(torch.autograd.Function):
    """``conv3d(x, w, padding=k//2)``, stride 1, no bias, with the swapped-axes weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, padding: tuple[int, int, int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        return _forward(x, w, padding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        # in the weight's dtype: under autocast the forward ran in half precision and its
        # gradient arrives so, while x and w are kept in theirs
        grad = grad.to(w.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv_transpose3d(grad, w, padding=ctx.padding).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = F.conv3d(x.to(grad.dtype).transpose(0, 1), grad.transpose(0, 1),
                              padding=ctx.padding).transpose(0, 1)
            if grad_w.stride() != w.stride():  # DDP's gradient buckets take the weight's layout
                grad_w = torch.empty_like(w).copy_(grad_w)
        return grad_x, grad_w, None


def conv3d_same(x: Tensor, weight: Tensor) -> Tensor:
    """Stride-1, 'same'-padded, bias-free 3-D convolution of B x Cin x D x H x W by
    Cout x Cin x k x k x k (odd k); fast weight gradient on CPU."""
    padding = tuple(k // 2 for k in weight.shape[2:])
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _forward(x, weight, padding)
    if x.device.type == "cpu":
        return _Conv3dSame.apply(x, weight, padding)
    return F.conv3d(x, weight, padding=padding)


class Conv3dSame(nn.Conv3d):
    """``nn.Conv3d(cin, cout, k, padding=k//2, bias=False)`` (same parameters and state-dict
    keys) whose CPU training backward uses :func:`conv3d_same`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv3d_same(x, self.weight)
