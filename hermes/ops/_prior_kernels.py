"""Element-wise building blocks of the fused prior-attention ops: native kernels or PyTorch.

Every function works on 2-D row-major chunks (rows x width) and exists twice: a pure-PyTorch
version (any device/dtype, the fallback) and a call into ``hermes._C`` (CPU float32/float64, CUDA
float32/float16/bfloat16 when compiled). :func:`kernels_for` picks the set for a tensor.

Conventions (all in place unless stated):

* ``ln_fwd(x, w, b, eps, out=None) -> (y, mean, rstd)``: LayerNorm of rows x C (into ``out``
  when given); mean/rstd are float32 (float64 for float64 input) of length rows.
* ``ln_bwd(dy, x, mean, rstd, w, dx, dw, db, accumulate)``: ``dx (+)= dLN/dx`` (``+=`` when
  ``accumulate``, e.g. onto a residual gradient), ``dw += sum(dy * xhat)``, ``db += sum(dy)``.
* ``head_softmax(s, heads)``: (heads*n) x cols (one column per voxel): softmax over each
  head's n consecutive rows, per column.
* ``head_softmax_bwd(s, dp, heads)``: s holds raw scores -> replaced by probabilities p;
  dp -> ``p * (dp - sum_group(p * dp))``.
* ``online_update(s, m, l) -> alpha``: rows x Lc raw scores (one row per prior query) ->
  ``exp(s - m_new)``; running max ``m`` and sum ``l`` updated; returns
  ``alpha = exp(m_old - m_new)`` (the factor to rescale the previous accumulator by).
* ``gather_bwd(s, dp, lse, dsum)``: s raw scores -> ``p = exp(s - lse)``;
  dp -> ``p * (dp - dsum)``.
* ``bias_gelu(u, b)``, ``bias_gelu_fwd_bwd(u, b, dg)``: exact GELU of ``u + b`` in place;
  the backward form also does ``dg -> dg * GELU'(u + b)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hermes.ops._extension import cuda_kernels_usable, extension, extension_loaded


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TorchKernels:
    """Pure-PyTorch implementations (every device and dtype)."""

    name = "torch"

    @staticmethod
    def ln_fwd(x: Tensor, w: Tensor, b: Tensor, eps: float,
               out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), w, b, eps)
        if out is not None:
            out.copy_(y)
            y = out
        return y, mean.reshape(-1).to(_stat_dtype(x)), rstd.reshape(-1).to(_stat_dtype(x))

    @staticmethod
    def ln_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, w: Tensor, dx: Tensor,
               dw: Tensor, db: Tensor, accumulate: bool) -> None:
        sd = _stat_dtype(x)
        xhat = (x.to(sd) - mean[:, None]) * rstd[:, None]
        g = dy.to(sd) * w.to(sd)
        c = x.shape[-1]
        gx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True) / c)
        gx = gx * rstd[:, None]
        if accumulate:
            dx.add_(gx.to(dx.dtype))
        else:
            dx.copy_(gx)
        dw.add_((dy.to(sd) * xhat).sum(0).to(dw.dtype))
        db.add_(dy.to(sd).sum(0).to(db.dtype))

    @staticmethod
    def head_softmax(s: Tensor, heads: int) -> None:
        v = s.view(heads, -1, s.shape[1])
        v.copy_(torch.softmax(v.to(_stat_dtype(s)), 1))

    @staticmethod
    def head_softmax_bwd(s: Tensor, dp: Tensor, heads: int) -> None:
        sd = _stat_dtype(s)
        p = torch.softmax(s.view(heads, -1, s.shape[1]).to(sd), 1)
        g = dp.view_as(p).to(sd)
        ds = p * (g - (p * g).sum(1, keepdim=True))
        s.view_as(p).copy_(p)
        dp.view_as(ds).copy_(ds)

    @staticmethod
    def online_update(s: Tensor, m: Tensor, l: Tensor) -> Tensor:
        sd = m.dtype
        sf = s.to(sd)
        m_new = torch.maximum(m, sf.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(sf - m_new[:, None])
        l.mul_(alpha).add_(p.sum(-1))
        m.copy_(m_new)
        s.copy_(p)
        return alpha

    @staticmethod
    def gather_bwd(s: Tensor, dp: Tensor, lse: Tensor, dsum: Tensor) -> None:
        sd = lse.dtype
        p = torch.exp(s.to(sd) - lse[:, None])
        ds = p * (dp.to(sd) - dsum[:, None])
        s.copy_(p)
        dp.copy_(ds)

    @staticmethod
    def bias_gelu(u: Tensor, bias: Tensor) -> None:
        """u <- GELU(u + bias) (exact, erf form), in place."""
        u.add_(bias)
        torch._C._nn.gelu(u, out=u)

    @staticmethod
    def bias_gelu_fwd_bwd(u: Tensor, bias: Tensor, dg: Tensor) -> None:
        """u <- GELU(u + bias); dg <- dg * GELU'(u + bias), in place."""
        u.add_(bias)
        torch.ops.aten.gelu_backward.grad_input(dg, u, grad_input=dg)
        torch._C._nn.gelu(u, out=u)


class NativeKernels(TorchKernels):
    """Calls into ``hermes._C`` (contiguous CPU float32/float64, CUDA float/half/bf16)."""

    name = "native"

    def __init__(self, device: torch.device) -> None:
        self._c = extension()
        self._cuda = device.type == "cuda"
        self._device = device

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream if self._cuda else 0

    @staticmethod
    def _code(t: Tensor) -> int:
        return _DTYPE_CODES[t.dtype]

    def ln_fwd(self, x: Tensor, w: Tensor, b: Tensor, eps: float, out: Tensor | None = None):
        rows, c = x.shape
        y = torch.empty_like(x) if out is None else out
        sd = _stat_dtype(x)
        mean = torch.empty(rows, dtype=sd, device=x.device)
        rstd = torch.empty(rows, dtype=sd, device=x.device)
        self._c.pa_ln_fwd(self._code(x), x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(),
                          mean.data_ptr(), rstd.data_ptr(), rows, c, float(eps), self._cuda,
                          self._stream())
        return y, mean, rstd

    def ln_bwd(self, dy, x, mean, rstd, w, dx, dw, db, accumulate):
        if self._cuda and torch.are_deterministic_algorithms_enabled():
            # the CUDA kernel sums dw/db with float atomics (run-to-run differences in the last
            # bits); under torch.use_deterministic_algorithms the PyTorch path runs instead
            TorchKernels.ln_bwd(dy, x, mean, rstd, w, dx, dw, db, accumulate)
            return
        rows, c = x.shape
        self._c.pa_ln_bwd(self._code(x), dy.data_ptr(), x.data_ptr(), mean.data_ptr(),
                          rstd.data_ptr(), w.data_ptr(), dx.data_ptr(), dw.data_ptr(),
                          db.data_ptr(), rows, c, bool(accumulate), self._cuda, self._stream())

    def head_softmax(self, s, heads):
        rows, cols = s.shape
        self._c.pa_head_softmax(self._code(s), s.data_ptr(), 0, heads, rows // heads, cols,
                                self._cuda, self._stream())

    def head_softmax_bwd(self, s, dp, heads):
        rows, cols = s.shape
        self._c.pa_head_softmax(self._code(s), s.data_ptr(), dp.data_ptr(), heads,
                                rows // heads, cols, self._cuda, self._stream())

    def online_update(self, s, m, l):
        rows, cols = s.shape
        alpha = torch.empty_like(m)
        self._c.pa_online_update(self._code(s), s.data_ptr(), m.data_ptr(), l.data_ptr(),
                                 alpha.data_ptr(), rows, cols, self._cuda, self._stream())
        return alpha

    def gather_bwd(self, s, dp, lse, dsum):
        rows, cols = s.shape
        self._c.pa_gather_bwd(self._code(s), s.data_ptr(), dp.data_ptr(), lse.data_ptr(),
                              dsum.data_ptr(), rows, cols, self._cuda, self._stream())

    def bias_gelu(self, u, bias):
        rows, cols = u.shape
        self._c.pa_bias_gelu(self._code(u), u.data_ptr(), bias.data_ptr(), 0, rows, cols,
                             self._cuda, self._stream())

    def bias_gelu_fwd_bwd(self, u, bias, dg):
        rows, cols = u.shape
        self._c.pa_bias_gelu(self._code(u), u.data_ptr(), bias.data_ptr(), dg.data_ptr(), rows,
                             cols, self._cuda, self._stream())


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_NATIVE: dict[str, NativeKernels] = {}


def native_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``hermes._C`` has the prior-attention kernels for this device and dtype."""
    if not extension_loaded():
        return False
    c = extension()
    if not hasattr(c, "pa_bias_gelu"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.float64)
    if device.type == "cuda":
        return (bool(getattr(c, "pa_cuda_compiled", False)) and dtype in _DTYPE_CODES
                and cuda_kernels_usable())
    return False


def kernels_for(t: Tensor, prefer_native: bool = True) -> type[TorchKernels] | NativeKernels:
    """The kernel set for tensors like ``t`` (native when available and wanted)."""
    # CUDA kernels launch on the current device: tensors on another GPU take the PyTorch path
    on_current = t.device.type != "cuda" or t.device.index == torch.cuda.current_device()
    if prefer_native and on_current and native_available(t.device, t.dtype):
        key = str(t.device)
        if key not in _NATIVE:
            _NATIVE[key] = NativeKernels(t.device)
        return _NATIVE[key]
    return TorchKernels
