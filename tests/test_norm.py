"""Fused instance norm + ReLU (native CPU kernel at inference) against PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hermes.ops as ops
from hermes.models.resunet import NORM_EPS, ResidualBlock
from hermes.ops.norm import instance_norm_relu, instance_norm_relu_reference


def _ref64(x: torch.Tensor, relu: bool) -> torch.Tensor:
    y = F.instance_norm(x.double(), eps=NORM_EPS)
    return (F.relu(y) if relu else y).float()


def test_native_kernel_is_built():
    assert ops.extension_loaded() and hasattr(ops.extension(), "instance_norm_act_cpu")


@pytest.mark.parametrize(
    "shape", [(1, 3, 5, 7, 9), (2, 1, 40, 33, 35), (1, 2, 2, 1, 1), (3, 4, 6, 5)]
)
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_reference(shape, relu):
    # an offset and scale per channel: the statistics must not lose precision (double sums)
    g = torch.Generator().manual_seed(0)
    offset = 300 * torch.rand(shape[:2] + (1,) * (len(shape) - 2), generator=g)
    x = torch.randn(shape, generator=g) * 7 + offset
    with torch.no_grad():
        y = instance_norm_relu(x, NORM_EPS, relu)
    torch.testing.assert_close(y, _ref64(x, relu), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(y, instance_norm_relu_reference(x, NORM_EPS, relu),
                               rtol=1e-4, atol=1e-4)
    assert x.shape == y.shape and y.is_contiguous()


def test_non_contiguous_input_and_constant_plane():
    x = torch.randn(2, 3, 8, 9, 10).permute(0, 1, 4, 3, 2)  # non-contiguous view
    x[0, 1] = 5.0  # zero variance: (x - mean) * rsqrt(eps) = 0
    with torch.no_grad():
        y = instance_norm_relu(x, NORM_EPS)
    torch.testing.assert_close(y, _ref64(x.contiguous(), True), rtol=1e-5, atol=2e-5)
    assert torch.equal(y[0, 1], torch.zeros_like(y[0, 1]))


def test_training_uses_autograd_reference():
    x = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: instance_norm_relu(t, NORM_EPS), (x,))


def test_switch_off_gives_reference(monkeypatch):
    x = torch.randn(1, 2, 9, 9, 9)
    monkeypatch.setenv("HERMES_FUSED_NORM", "0")
    with torch.no_grad():
        assert torch.equal(instance_norm_relu(x, NORM_EPS),
                           instance_norm_relu_reference(x, NORM_EPS))


def test_bad_shapes_are_refused():
    with torch.no_grad(), pytest.raises(ValueError, match="spatial"):
        instance_norm_relu(torch.randn(4, 5), NORM_EPS)
    with torch.no_grad(), pytest.raises(ValueError, match="more than one"):
        instance_norm_relu(torch.randn(1, 2, 1, 1, 1), NORM_EPS)


def test_residual_block_shares_the_shortcut_activation():
    """The width-changing block computes norm + ReLU once for conv1 and the shortcut; its output
    equals the unshared composition, in training (autograd) and at inference (fused)."""
    torch.manual_seed(0)
    block = ResidualBlock(4, 6)
    x = torch.randn(2, 4, 10, 9, 8, requires_grad=True)

    def unshared(t):
        a = F.relu(F.instance_norm(t, eps=NORM_EPS))
        c = F.relu(F.instance_norm(block.conv1.conv(a), eps=NORM_EPS))
        return block.conv2.conv(c) + block.shortcut.conv(a)

    torch.testing.assert_close(block(x), unshared(x), rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(block(x).sum(), x)[0]
    g2 = torch.autograd.grad(unshared(x).sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), unshared(x), rtol=1e-4, atol=1e-4)
