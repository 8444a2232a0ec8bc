"""The fast-weight-gradient 3-D convolution equals PyTorch's convolution, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hermes.ops.conv3d import Conv3dSame, conv3d_same


def test_gradcheck_float64():
    x = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv3d_same, (x, w))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_torch_conv_float32(k):
    x = torch.randn(2, 8, 12, 9, 10, requires_grad=True)
    w = torch.randn(5, 8, k, k, k, requires_grad=True)
    y = conv3d_same(x, w)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ref = F.conv3d(x, w, padding=k // 2)
    rgx, rgw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cin, cout", [(1, 8), (8, 1), (3, 4)])
def test_weight_gradient_has_the_weights_strides(cin, cout):
    """DDP's gradient buckets take the weight's layout: another one (the swapped-axes gradient of
    a one-channel input had strides 27, 216, ...) costs a copy and a warning every step."""
    x = torch.randn(2, cin, 6, 5, 4)
    w = torch.randn(cout, cin, 3, 3, 3, requires_grad=True)
    conv3d_same(x, w).sum().backward()
    assert w.grad.stride() == w.stride()


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_backward_under_cpu_autocast(onednn, monkeypatch):
    """Under bfloat16 autocast (PyTorch's path computes the forward in bfloat16) the backward
    returns float32 gradients for float32 tensors, close to the float32 ones."""
    monkeypatch.setenv("HERMES_ONEDNN_CONV", onednn)
    x = torch.randn(2, 3, 6, 5, 4, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 6, 5, 4)
    ref = torch.autograd.grad(F.conv3d(x, w, padding=1), (x, w), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv3d_same(x, w)
    got = torch.autograd.grad(y, (x, w), g.to(y.dtype))
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.1 * b.abs().max().item())


def test_module_keeps_conv3d_parameters():
    m = Conv3dSame(4, 6)
    assert list(m.state_dict()) == ["weight"] and m.weight.shape == (6, 4, 3, 3, 3)
    x = torch.randn(1, 4, 6, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.conv3d(x, m.weight, padding=1))
    with pytest.raises(ValueError, match="odd"):
        Conv3dSame(2, 2, 2)


@pytest.mark.parametrize("shape", [(1, 16, 20, 18, 16), (1, 3, 7, 9, 5), (2, 8, 12, 10, 9)])
def test_inference_path_matches_torch(shape, monkeypatch):
    """Inference (oneDNN forward, also for batch-1 small maps) equals PyTorch's convolution; the
    switch restores PyTorch's own path exactly."""
    x = torch.randn(shape)
    w = torch.randn(12, shape[1], 3, 3, 3)
    ref = F.conv3d(x, w, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(conv3d_same(x, w), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(conv3d_same(x[:, :, :, :, 1:], w), F.conv3d(
            x[:, :, :, :, 1:], w, padding=1), rtol=1e-4, atol=1e-4)  # non-contiguous
        monkeypatch.setenv("HERMES_ONEDNN_CONV", "0")
        assert torch.equal(conv3d_same(x, w), ref)
    # input gradient with a frozen weight (fine-tuning with a frozen backbone)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(conv3d_same(xg, w).sum(), xg)
    (rg,) = torch.autograd.grad(F.conv3d(xg, w, padding=1).sum(), xg)
    torch.testing.assert_close(g, rg)
