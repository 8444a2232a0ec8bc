"""Fused prior-feature interaction: one Hermes attention block without per-voxel Q/K/V.

Same mathematics as :func:`hermes.ops.prior_attention.prior_attention_block_reference`. The
streaming ops below are organised so that nothing of size L x C (besides the features
themselves), L x 4C or L x N x heads is kept for backward; GPUs run PyTorch's formulations by
default instead (faster there, keeping those tensors: :func:`choose_formulation`). Notation:
L voxels, N priors, C width, H heads of width d, I = H * d, ``s = d ** -0.5``; x = LayerNorm
of one voxel's features.

**priors <- features** (:func:`prior_gather`). With q_hj the query of prior j in head h, the
score of voxel l is ``q_hj . (W_k,h x_l) * s = x_l . a_hj`` with ``a_hj = s * W_k,h^T q_hj``:
the projections fold into an (H*N) x C matrix ``A``. The voxels are streamed in chunks: scores
``A x^T`` (H*N x chunk), online softmax over L (running max/sum, rescaled accumulator), and the
weighted sum ``Z = sum_l p_l x_l`` (H*N x C). Only afterwards the value and output projections are
applied to Z (``W_v,h Z_hj``, then ``W_out``): small tensors, plain autograd. Backward recomputes
the chunk scores from the saved log-sum-exp (flash-style) and uses ``D = rowsum(dZ * Z)``.

**features <- priors** (:func:`feature_scatter`). Scores ``x_l . a_hj`` with
``a_hj = s * W_q,h^T k_hj`` and the output ``sum_hj p_lhj (W_out,h v_hj)`` fold into two (H*N) x C
matrices ``A`` and ``V``: per chunk LN -> GEMM (scores H*N x chunk) -> softmax over N per head ->
GEMM -> residual (the output bias is folded into ``V`` as ``bias / H`` per row, exact because
each head's probabilities sum to one). Backward recomputes LN and the probabilities.

**feature MLP** (:func:`feature_mlp`). LN -> fc1 -> GELU -> fc2 -> + bias + residual per chunk;
the chunk x 4C hidden activations are recomputed in backward instead of stored (small volumes
run PyTorch's layers instead: ``MLP_STREAM_MIN``).

The prior-side MLP works on N tokens only and uses plain PyTorch.

Cost per voxel and sublayer: the folded GEMMs cost ``2 * H * N * C`` multiply-adds against
``C * I + N * I`` for the projected (official) form, so folding pays while ``H * N < C + N``
(every level at N = 26; not at N = 82, where the official GEMM count is lower: every level
at N = 82 takes the projected form, see :func:`use_fold`: streamed over the voxels by
:mod:`hermes.ops.prior_attention_projected`, or PyTorch's SDPA for training where that is
faster). On GPUs these streaming ops lose to single-pass PyTorch attention at Hermes' shapes
(their kernels take microseconds, the host time per op call far more), so there the sublayers
run through SDPA or explicit attention and the feature MLP through PyTorch's layers: see
:func:`choose_formulation`. Memory (streaming ops): the
saved tensors are the block inputs plus B x (H*N) x C folds, Z and its log-sum-exp; scratch is
one chunk (``default_chunk``) per buffer. First-order gradients only (no double backward).

The three streaming parts are ``torch.library`` custom ops (``hermes::prior_gather_fwd`` /
``_bwd``, ``hermes::feature_scatter_fwd`` / ``_bwd``, ``hermes::feature_mlp_fwd`` / ``_bwd``) with
fake (meta) implementations and autograd; their element-wise parts run in ``hermes._C`` (CPU
float32/float64, CUDA) and fall back to PyTorch elsewhere. GEMMs are torch (BLAS / cuBLAS).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from hermes.ops._prior_kernels import TorchKernels, kernels_for
from hermes.ops.prior_attention import (
    CrossAttentionParams,
    MLPParams,
    PriorBlockParams,
    mlp_sublayer,
)

__all__ = [
    "prior_attention_block_fused",
    "prior_cross_attention_fused",
    "feature_cross_attention_fused",
    "feature_mlp_fused",
    "prior_gather",
    "feature_scatter",
    "feature_mlp",
    "fold_prior_queries",
    "fold_feature_keys_values",
    "set_native_kernels",
    "set_prior_impl",
    "resolve_impl",
    "default_chunk",
    "use_fold",
    "choose_formulation",
]

IMPLS = ("fused", "reference")

_USE_NATIVE = os.environ.get("HERMES_PRIOR_NATIVE", "1") not in ("0", "false", "no")


def set_native_kernels(enabled: bool) -> None:
    """Use the ``hermes._C`` element-wise kernels when available (default) or PyTorch only."""
    global _USE_NATIVE
    _USE_NATIVE = bool(enabled)


def resolve_impl(impl: str | None = None) -> str:
    """The implementation to run: ``impl`` if given, else ``$HERMES_PRIOR_IMPL``, else fused."""
    choice = impl if impl is not None else os.environ.get("HERMES_PRIOR_IMPL", "fused")
    choice = choice.strip().lower()
    if choice not in IMPLS:
        raise ValueError(f"prior attention implementation must be one of {IMPLS}, got {impl!r}"
                         if impl is not None else
                         f"HERMES_PRIOR_IMPL must be one of {IMPLS}, got {choice!r}")
    return choice


def set_prior_impl(module: torch.nn.Module, impl: str | None) -> torch.nn.Module:
    """Set the implementation of every attention block in ``module`` (None: back to the default).

    Args:
        module: a model or any module containing ``PriorAttentionBlock`` s.
        impl: ``"fused"``, ``"reference"`` or None (follow ``HERMES_PRIOR_IMPL``).
    Returns:
        ``module``.
    """
    from hermes.models.prior_fusion import PriorAttentionBlock

    if impl is not None:
        resolve_impl(impl)
    for m in module.modules():
        if isinstance(m, PriorAttentionBlock):
            m.impl = impl
    return module


def _kern(t: Tensor):
    return kernels_for(t, _USE_NATIVE)


def default_chunk(width: int, device: torch.device) -> int:
    """Voxels per streaming chunk: ``width`` x chunk is about 2^18 values (1 MiB of float32) per
    CPU thread, at most 2^21, so each thread's share of a chunk's GEMM operands stays in its L2
    cache (MKL's GEMMs with a 2^21-value output ran at ~45 instead of ~68 GFLOP/s per core at
    level 2: 1.1-1.2x faster blocks measured with 1 and 2 threads); 2^24 on GPUs. On the CPU a
    power of two loses 1/16: a chunk is the row stride of the transposed score buffers, and
    power-of-two strides make their rows share cache sets (MKL's GEMMs reading such a 104 x
    2,048 buffer transposed ran 1.2-1.3x slower than at 1,920 or 2,000 columns)."""
    if device.type == "cpu":
        budget = min(1 << 21, (1 << 18) * max(1, torch.get_num_threads()))
    else:
        budget = 1 << 24
    chunk = max(256, min(1 << 16, budget // max(width, 1)))
    if device.type == "cpu" and chunk & (chunk - 1) == 0:
        chunk -= chunk // 16
    return chunk


def _chunk_arg(chunk: int | None, width: int, device: torch.device) -> int:
    if chunk is None:
        return default_chunk(width, device)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of voxels, got {chunk}")
    return int(chunk)


#: Largest chunk of the ops that sum over voxels (:func:`prior_gather`, the streamed projected
#: sublayers) for float16 features.
_HALF_CHUNK = 2048


def _sum_chunk(features: Tensor, width: int, chunk: int | None) -> int:
    """:func:`_chunk_arg` for an op summing a chunk's voxels in one GEMM: for float16 features
    at most ``_HALF_CHUNK``, so that the chunk's unnormalised sum (softmax weights <= 1 times
    bounded values) stays far from float16's 65504."""
    chunk = _chunk_arg(chunk, width, features.device)
    return min(chunk, _HALF_CHUNK) if features.dtype == torch.float16 else chunk


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (training rather than inference)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _dense(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The op's tensor arguments, contiguous: the native kernels read raw row-major buffers (the
    wrappers pass contiguous tensors; direct calls of the custom ops may not)."""
    return tuple(t.contiguous() for t in tensors)


def _fresh(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Uninitialised contiguous tensors shaped like ``tensors``: the fake kernels' results, as
    the real ones return contiguous tensors whatever the inputs' strides."""
    return tuple(t.new_empty(t.shape) for t in tensors)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class _Workspace:
    """Scratch buffers reused across the chunks of one op call (fresh allocations of large
    tensors cost page faults on every chunk on CPU)."""

    def __init__(self, like: Tensor) -> None:
        self._like = like
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype or self._like.dtype, device=self._like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc possibly wider (float32 accumulators of half inputs)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b).to(acc.dtype))


def _chunks(length: int, chunk: int):
    """``(start, stop)`` of equal chunks of at most ``chunk`` voxels covering ``length`` (512
    voxels at most 504 each: two of 256, not 504 and a GEMM-starved 8)."""
    count = -(-length // chunk)
    size = -(-length // count)
    for start in range(0, length, size):
        yield start, min(start + size, length)


# ---------------------------------------------------------------------------------------------
# priors <- features: Z = softmax_L(A LN(F)^T) LN(F)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hermes::prior_gather_fwd", mutates_args=())
def prior_gather_fwd(
    features: Tensor, fold: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """features B x L x C, fold B x M x C -> (Z B x M x C, lse B x M float32/64)."""
    features, fold, norm_weight, norm_bias = _dense(features, fold, norm_weight, norm_bias)
    k = _kern(features)
    b, length, c = features.shape
    m_rows = fold.shape[1]
    sd = torch.float64 if features.dtype == torch.float64 else torch.float32
    z = torch.empty(b, m_rows, c, dtype=features.dtype, device=features.device)
    lse = torch.empty(b, m_rows, dtype=sd, device=features.device)
    acc_t = _acc_dtype(features)
    ws = _Workspace(features)
    for i in range(b):
        fb, ab = features[i], fold[i]
        run_max = torch.full((m_rows,), -math.inf, dtype=sd, device=features.device)
        run_sum = torch.zeros(m_rows, dtype=sd, device=features.device)
        acc = torch.zeros(m_rows, c, dtype=acc_t, device=features.device)
        for s0, s1 in _chunks(length, chunk):
            x, _, _ = k.ln_fwd(fb[s0:s1], norm_weight, norm_bias, eps,
                               out=ws.get("x", s1 - s0, c))
            s = torch.mm(ab, x.t(), out=ws.get("s", m_rows, s1 - s0))
            alpha = k.online_update(s, run_max, run_sum)
            if s0 > 0:
                acc.mul_(alpha.to(acc_t)[:, None])
            _addmm_acc(acc, s, x)
        z[i] = (acc / run_sum.to(acc_t)[:, None]).to(z.dtype)
        lse[i] = run_max + torch.log(run_sum)
    return z, lse


@prior_gather_fwd.register_fake
def _(features, fold, norm_weight, norm_bias, eps, chunk):
    sd = torch.float64 if features.dtype == torch.float64 else torch.float32
    return (fold.new_empty(fold.shape[0], fold.shape[1], features.shape[2]),
            fold.new_empty(fold.shape[0], fold.shape[1], dtype=sd))


@torch.library.custom_op("hermes::prior_gather_bwd", mutates_args=())
def prior_gather_bwd(
    grad_z: Tensor, features: Tensor, fold: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    z: Tensor, lse: Tensor, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (features, fold, norm_weight, norm_bias) of :func:`prior_gather_fwd`."""
    grad_z, features, fold, norm_weight, norm_bias, z, lse = _dense(
        grad_z, features, fold, norm_weight, norm_bias, z, lse)
    k = _kern(features)
    b, length, c = features.shape
    m_rows = fold.shape[1]
    acc_t = _acc_dtype(features)
    d_feat = torch.empty_like(features)
    d_fold = torch.zeros(b, m_rows, c, dtype=acc_t, device=features.device)
    d_w = torch.zeros(c, dtype=acc_t, device=features.device)
    d_b = torch.zeros(c, dtype=acc_t, device=features.device)
    dsum = (grad_z.to(lse.dtype) * z.to(lse.dtype)).sum(-1)  # B x M
    ws = _Workspace(features)
    for i in range(b):
        lhs = torch.cat([fold[i], grad_z[i]], 0)  # 2M x C: scores and dP in one GEMM
        rhs = torch.cat([grad_z[i], fold[i]], 0)  # dx = P^T dZ + dS^T A in one GEMM
        for s0, s1 in _chunks(length, chunk):
            xin = features[i, s0:s1]
            x, mean, rstd = k.ln_fwd(xin, norm_weight, norm_bias, eps,
                                     out=ws.get("x", s1 - s0, c))
            sp = torch.mm(lhs, x.t(), out=ws.get("sp", 2 * m_rows, s1 - s0))
            s, dp = sp[:m_rows], sp[m_rows:]
            k.gather_bwd(s, dp, lse[i], dsum[i])  # s <- P, dp <- dS: sp = [P; dS]
            _addmm_acc(d_fold[i], dp, x)
            dx = torch.mm(sp.t(), rhs, out=ws.get("dx", s1 - s0, c))
            k.ln_bwd(dx, xin, mean, rstd, norm_weight, d_feat[i, s0:s1], d_w, d_b, False)
    return d_feat, d_fold.to(fold.dtype), d_w.to(norm_weight.dtype), d_b.to(norm_bias.dtype)


@prior_gather_bwd.register_fake
def _(grad_z, features, fold, norm_weight, norm_bias, z, lse, eps, chunk):
    return _fresh(features, fold, norm_weight, norm_bias)


def _pg_setup(ctx, inputs, output):
    features, fold, norm_weight, norm_bias, eps, chunk = inputs
    z, lse = output
    ctx.save_for_backward(features, fold, norm_weight, norm_bias, z, lse)
    ctx.eps, ctx.chunk = eps, chunk
    ctx.mark_non_differentiable(lse)


def _pg_backward(ctx, grad_z, grad_lse):
    features, fold, norm_weight, norm_bias, z, lse = ctx.saved_tensors
    if grad_z is None:
        return None, None, None, None, None, None
    gf, ga, gw, gb = prior_gather_bwd(grad_z, features, fold, norm_weight, norm_bias, z, lse,
                                      ctx.eps, ctx.chunk)
    return gf, ga, gw, gb, None, None


prior_gather_fwd.register_autograd(_pg_backward, setup_context=_pg_setup)


def prior_gather(features: Tensor, fold: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                 eps: float, chunk: int | None = None) -> Tensor:
    """``softmax_over_L(fold @ LN(features)^T) @ LN(features)`` without an M x L score tensor.

    Args:
        features: B x L x C voxel tokens.
        fold: B x M x C folded prior queries (one row per head and prior).
        norm_weight, norm_bias: C, LayerNorm of the features.
    Returns:
        B x M x C.
    """
    _check_stream_args(features, fold, norm_weight, norm_bias)
    chunk = _sum_chunk(features, max(2 * fold.shape[1], features.shape[2]), chunk)
    return prior_gather_fwd(features.contiguous(), fold.contiguous(), norm_weight.contiguous(),
                            norm_bias.contiguous(), float(eps), int(chunk))[0]


# ---------------------------------------------------------------------------------------------
# features <- priors: F + softmax_N,per head(LN(F) A^T) V + bias
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hermes::feature_scatter_fwd", mutates_args=())
def feature_scatter_fwd(
    features: Tensor, fold_k: Tensor, fold_v: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    out_bias: Tensor, heads: int, eps: float, chunk: int,
) -> Tensor:
    """features B x L x C, fold_k/fold_v B x (H*N) x C -> B x L x C."""
    features, fold_k, fold_v, norm_weight, norm_bias, out_bias = _dense(
        features, fold_k, fold_v, norm_weight, norm_bias, out_bias)
    k = _kern(features)
    b, length, c = features.shape
    out = torch.empty_like(features)
    ws = _Workspace(features)
    # softmax rows sum to one per head, so the output bias folds into the value rows: bias / H
    fold_vb = fold_v + out_bias / heads
    for i in range(b):
        for s0, s1 in _chunks(length, chunk):
            x, _, _ = k.ln_fwd(features[i, s0:s1], norm_weight, norm_bias, eps,
                               out=ws.get("x", s1 - s0, c))
            # scores transposed (H*N x chunk): the softmax over each head's priors runs along
            # contiguous voxels
            s = torch.mm(fold_k[i], x.t(), out=ws.get("s", fold_k.shape[1], s1 - s0))
            k.head_softmax(s, heads)
            torch.addmm(features[i, s0:s1], s.t(), fold_vb[i], out=out[i, s0:s1])
    return out


@feature_scatter_fwd.register_fake
def _(features, fold_k, fold_v, norm_weight, norm_bias, out_bias, heads, eps, chunk):
    return features.new_empty(features.shape)


@torch.library.custom_op("hermes::feature_scatter_bwd", mutates_args=())
def feature_scatter_bwd(
    grad_out: Tensor, features: Tensor, fold_k: Tensor, fold_v: Tensor, norm_weight: Tensor,
    norm_bias: Tensor, heads: int, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (features, fold_k, fold_v, norm_weight, norm_bias, out_bias)."""
    grad_out, features, fold_k, fold_v, norm_weight, norm_bias = _dense(
        grad_out, features, fold_k, fold_v, norm_weight, norm_bias)
    k = _kern(features)
    b, length, c = features.shape
    acc_t = _acc_dtype(features)
    d_feat = grad_out.clone()  # residual
    d_k = torch.zeros(fold_k.shape, dtype=acc_t, device=features.device)
    d_v = torch.zeros(fold_v.shape, dtype=acc_t, device=features.device)
    d_w = torch.zeros(c, dtype=acc_t, device=features.device)
    d_b = torch.zeros(c, dtype=acc_t, device=features.device)
    d_bias = grad_out.to(acc_t).sum((0, 1))
    ws = _Workspace(features)
    m_rows = fold_k.shape[1]
    for i in range(b):
        for s0, s1 in _chunks(length, chunk):
            xin, g = features[i, s0:s1], grad_out[i, s0:s1]
            x, mean, rstd = k.ln_fwd(xin, norm_weight, norm_bias, eps,
                                     out=ws.get("x", s1 - s0, c))
            s = torch.mm(fold_k[i], x.t(), out=ws.get("s", m_rows, s1 - s0))  # transposed
            dp = torch.mm(fold_v[i], g.t(), out=ws.get("dp", m_rows, s1 - s0))
            k.head_softmax_bwd(s, dp, heads)  # s <- P, dp <- dS
            _addmm_acc(d_v[i], s, g)
            _addmm_acc(d_k[i], dp, x)
            dx = torch.mm(dp.t(), fold_k[i], out=ws.get("dx", s1 - s0, c))
            k.ln_bwd(dx, xin, mean, rstd, norm_weight, d_feat[i, s0:s1], d_w, d_b, True)
    return (d_feat, d_k.to(fold_k.dtype), d_v.to(fold_v.dtype), d_w.to(norm_weight.dtype),
            d_b.to(norm_bias.dtype), d_bias.to(norm_bias.dtype))


@feature_scatter_bwd.register_fake
def _(grad_out, features, fold_k, fold_v, norm_weight, norm_bias, heads, eps, chunk):
    return _fresh(features, fold_k, fold_v, norm_weight, norm_bias, norm_bias)


def _fs_setup(ctx, inputs, output):
    features, fold_k, fold_v, norm_weight, norm_bias, out_bias, heads, eps, chunk = inputs
    ctx.save_for_backward(features, fold_k, fold_v, norm_weight, norm_bias)
    ctx.heads, ctx.eps, ctx.chunk = heads, eps, chunk


def _fs_backward(ctx, grad_out):
    features, fold_k, fold_v, norm_weight, norm_bias = ctx.saved_tensors
    grads = feature_scatter_bwd(grad_out, features, fold_k, fold_v, norm_weight, norm_bias,
                                ctx.heads, ctx.eps, ctx.chunk)
    return (*grads, None, None, None)


feature_scatter_fwd.register_autograd(_fs_backward, setup_context=_fs_setup)


def feature_scatter(features: Tensor, fold_k: Tensor, fold_v: Tensor, norm_weight: Tensor,
                    norm_bias: Tensor, out_bias: Tensor, heads: int, eps: float,
                    chunk: int | None = None) -> Tensor:
    """``F + softmax(LN(F) fold_k^T, per head over N) @ fold_v + out_bias``.

    Args:
        features: B x L x C.
        fold_k, fold_v: B x (heads * N) x C, rows ordered head-major (row = h * N + j).
        norm_weight, norm_bias, out_bias: C.
    Returns:
        B x L x C.
    """
    _check_stream_args(features, fold_k, norm_weight, norm_bias)
    if fold_v.shape != fold_k.shape:
        raise ValueError(f"fold_v shape {tuple(fold_v.shape)} != fold_k {tuple(fold_k.shape)}")
    if fold_k.shape[1] % heads:
        raise ValueError(f"fold rows {fold_k.shape[1]} not divisible by heads={heads}")
    if out_bias.shape != (features.shape[2],):
        raise ValueError(f"out_bias must have shape ({features.shape[2]},)")
    chunk = _chunk_arg(chunk, max(fold_k.shape[1], features.shape[2]), features.device)
    return feature_scatter_fwd(features.contiguous(), fold_k.contiguous(), fold_v.contiguous(),
                               norm_weight.contiguous(), norm_bias.contiguous(),
                               out_bias.contiguous(), int(heads), float(eps), int(chunk))


# ---------------------------------------------------------------------------------------------
# feature MLP: F + fc2(GELU(fc1(LN(F)))) with the hidden layer recomputed in backward
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hermes::feature_mlp_fwd", mutates_args=())
def feature_mlp_fwd(
    features: Tensor, norm_weight: Tensor, norm_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
    b2: Tensor, eps: float, chunk: int,
) -> Tensor:
    """features B x L x C, w1 Hd x C, w2 C x Hd -> B x L x C."""
    features, norm_weight, norm_bias, w1, b1, w2, b2 = _dense(
        features, norm_weight, norm_bias, w1, b1, w2, b2)
    k = _kern(features)
    b, length, c = features.shape
    hidden = w1.shape[0]
    out = torch.empty_like(features)
    w1t, w2t = w1.t(), w2.t()
    ws = _Workspace(features)
    for i in range(b):
        for s0, s1 in _chunks(length, chunk):
            h, _, _ = k.ln_fwd(features[i, s0:s1], norm_weight, norm_bias, eps,
                               out=ws.get("h", s1 - s0, c))
            u = torch.mm(h, w1t, out=ws.get("u", s1 - s0, hidden))
            k.bias_gelu(u, b1)
            o = out[i, s0:s1]
            torch.addmm(features[i, s0:s1], u, w2t, out=o)
            o.add_(b2)
    return out


@feature_mlp_fwd.register_fake
def _(features, norm_weight, norm_bias, w1, b1, w2, b2, eps, chunk):
    return features.new_empty(features.shape)


@torch.library.custom_op("hermes::feature_mlp_bwd", mutates_args=())
def feature_mlp_bwd(
    grad_out: Tensor, features: Tensor, norm_weight: Tensor, norm_bias: Tensor, w1: Tensor,
    b1: Tensor, w2: Tensor, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (features, norm_weight, norm_bias, w1, b1, w2, b2), the fc1 output recomputed
    per chunk."""
    grad_out, features, norm_weight, norm_bias, w1, b1, w2 = _dense(
        grad_out, features, norm_weight, norm_bias, w1, b1, w2)
    k = _kern(features)
    b, length, c = features.shape
    acc_t = _acc_dtype(features)
    d_feat = grad_out.clone()  # residual
    dev = features.device
    d_w1 = torch.zeros(w1.shape, dtype=acc_t, device=dev)
    d_b1 = torch.zeros(b1.shape, dtype=acc_t, device=dev)
    d_w2 = torch.zeros(w2.shape, dtype=acc_t, device=dev)
    d_nw = torch.zeros(c, dtype=acc_t, device=dev)
    d_nb = torch.zeros(c, dtype=acc_t, device=dev)
    d_b2 = grad_out.to(acc_t).sum((0, 1))
    w1t = w1.t()
    hidden = w1.shape[0]
    ws = _Workspace(features)
    for i in range(b):
        for s0, s1 in _chunks(length, chunk):
            xin, g = features[i, s0:s1], grad_out[i, s0:s1]
            h, mean, rstd = k.ln_fwd(xin, norm_weight, norm_bias, eps,
                                     out=ws.get("h", s1 - s0, c))
            u = torch.mm(h, w1t, out=ws.get("u", s1 - s0, hidden))
            dgu = torch.mm(g, w2, out=ws.get("dg", s1 - s0, hidden))
            k.bias_gelu_fwd_bwd(u, b1, dgu)  # u <- GELU(u + b1), dgu <- dU
            _addmm_acc(d_w2, g.t(), u)
            _addmm_acc(d_w1, dgu.t(), h)
            d_b1 += dgu.sum(0, dtype=acc_t)
            dh = torch.mm(dgu, w1, out=ws.get("dh", s1 - s0, c))
            k.ln_bwd(dh, xin, mean, rstd, norm_weight, d_feat[i, s0:s1], d_nw, d_nb, True)
    return (d_feat, d_nw.to(norm_weight.dtype), d_nb.to(norm_bias.dtype), d_w1.to(w1.dtype),
            d_b1.to(b1.dtype), d_w2.to(w2.dtype), d_b2.to(b1.dtype))


@feature_mlp_bwd.register_fake
def _(grad_out, features, norm_weight, norm_bias, w1, b1, w2, eps, chunk):
    return (*_fresh(features, norm_weight, norm_bias, w1, b1, w2), w2.new_empty(w2.shape[0]))


def _fm_setup(ctx, inputs, output):
    features, norm_weight, norm_bias, w1, b1, w2, b2, eps, chunk = inputs
    ctx.save_for_backward(features, norm_weight, norm_bias, w1, b1, w2)
    ctx.eps, ctx.chunk = eps, chunk


def _fm_backward(ctx, grad_out):
    grads = feature_mlp_bwd(grad_out, *ctx.saved_tensors, ctx.eps, ctx.chunk)
    return (*grads, None, None)


feature_mlp_fwd.register_autograd(_fm_backward, setup_context=_fm_setup)


def feature_mlp(features: Tensor, p: MLPParams, chunk: int | None = None) -> Tensor:
    """``F + fc2(GELU(fc1(LN(F))))`` for features B x L x C, streamed over chunks of voxels
    (the hidden layer recomputed in the backward, not stored)."""
    if features.dim() != 3:
        raise ValueError(f"features must be B x L x C, got shape {tuple(features.shape)}")
    c = features.shape[2]
    hidden = p.w1.shape[0]
    if p.w1.shape != (hidden, c) or p.w2.shape != (c, hidden):
        raise ValueError(f"MLP weights {tuple(p.w1.shape)}/{tuple(p.w2.shape)} do not match "
                         f"width {c}")
    dt = features.dtype  # weights follow the features (e.g. float16 features under autocast)
    ws = [t.to(dt).contiguous() for t in (p.norm_weight, p.norm_bias, p.w1, p.b1, p.w2, p.b2)]
    training = _needs_grad(features, *ws)
    # chunks sized by the hidden width (forward, measured best at level 2) or, for training, 4x
    # longer: the backward's weight-gradient GEMMs sum over the chunk's voxels (CPU, level 3,
    # forward + backward: 1.1x faster with 960 than 240 voxels on one thread, 1,920 than 480 on
    # two; level 2 unchanged)
    chunk = _chunk_arg(chunk, c if training else hidden, features.device)
    return feature_mlp_fwd(features.contiguous(), *ws, float(p.eps), int(chunk))


# ---------------------------------------------------------------------------------------------
# folding of the projections (small tensors, plain autograd)
# ---------------------------------------------------------------------------------------------


def _split_heads(p: CrossAttentionParams, c: int) -> tuple[int, int]:
    inner = p.w_q.shape[0]
    if p.heads < 1 or inner % p.heads:
        raise ValueError(f"inner width {inner} is not divisible by heads={p.heads}")
    if p.w_q.shape != (inner, c) or p.w_kv.shape != (2 * inner, c) or p.w_out.shape != (c, inner):
        raise ValueError(
            f"cross-attention weights w_q {tuple(p.w_q.shape)}, w_kv {tuple(p.w_kv.shape)}, "
            f"w_out {tuple(p.w_out.shape)} do not match width {c} / inner {inner}")
    return p.heads, inner // p.heads


def fold_prior_queries(priors: Tensor, p: CrossAttentionParams) -> Tensor:
    """B x N x C priors -> B x (H*N) x C rows ``a_hj = d^-1/2 W_k,h^T W_q,h LN(p_j)``."""
    b, n, c = priors.shape
    heads, d = _split_heads(p, c)
    pq = F.layer_norm(priors, (c,), p.norm_q_weight, p.norm_q_bias, p.eps)
    q = F.linear(pq, p.w_q).view(b, n, heads, d)
    wk = p.w_kv[: heads * d].view(heads, d, c)
    return (torch.einsum("bjhe,hec->bhjc", q, wk) * d**-0.5).reshape(b, heads * n, c)


def _unfold_prior_values(z: Tensor, priors: Tensor, p: CrossAttentionParams) -> Tensor:
    """Z B x (H*N) x C -> priors + W_out [W_v,h Z_hj]_h + b_out."""
    b, n, c = priors.shape
    heads, d = _split_heads(p, c)
    wv = p.w_kv[heads * d:].view(heads, d, c)
    o = torch.einsum("bhjc,hec->bjhe", z.view(b, heads, n, c), wv).reshape(b, n, heads * d)
    return priors + F.linear(o, p.w_out, p.b_out)


def fold_feature_keys_values(priors: Tensor, p: CrossAttentionParams) -> tuple[Tensor, Tensor]:
    """B x N x C priors -> (A, V), each B x (H*N) x C, for the features <- priors attention.

    ``A_hj = d^-1/2 W_q,h^T k_hj`` and ``V_hj = W_out,h v_hj`` with ``[k, v] = W_kv LN(p)``.
    """
    b, n, c = priors.shape
    heads, d = _split_heads(p, c)
    pk = F.layer_norm(priors, (c,), p.norm_kv_weight, p.norm_kv_bias, p.eps)
    kv = F.linear(pk, p.w_kv)
    k, v = kv[..., : heads * d].view(b, n, heads, d), kv[..., heads * d:].view(b, n, heads, d)
    a = torch.einsum("bjhe,hec->bhjc", k, p.w_q.view(heads, d, c)) * d**-0.5
    vf = torch.einsum("bjhe,che->bhjc", v, p.w_out.view(c, heads, d))
    return a.reshape(b, heads * n, c), vf.reshape(b, heads * n, c)


# ---------------------------------------------------------------------------------------------
# sublayers and the block
# ---------------------------------------------------------------------------------------------


def _check_stream_args(features: Tensor, fold: Tensor, w: Tensor, b: Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be B x L x C, got shape {tuple(features.shape)}")
    if fold.dim() != 3 or fold.shape[0] != features.shape[0] or fold.shape[2] != features.shape[2]:
        raise ValueError(f"fold must be B x M x C = {features.shape[0]} x M x {features.shape[2]}"
                         f", got {tuple(fold.shape)}")
    if features.shape[1] < 1 or fold.shape[1] < 1:
        raise ValueError("features and fold need at least one token each")
    if w.shape != (features.shape[2],) or b.shape != (features.shape[2],):
        raise ValueError(f"LayerNorm weight/bias must have shape ({features.shape[2]},)")
    for name, t in (("fold", fold), ("norm_weight", w), ("norm_bias", b)):
        if t.dtype != features.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != features dtype {features.dtype}")
        if t.device != features.device:
            raise ValueError(f"{name} is on {t.device}, features on {features.device}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"features must be floating point, got {features.dtype}")


def check_block_inputs(features: Tensor, priors: Tensor) -> None:
    """Validate the B x L x C / B x N x C pair (same batch, width, dtype and device)."""
    if features.dim() != 3 or priors.dim() != 3:
        raise ValueError(f"features must be B x L x C and priors B x N x C, got "
                         f"{tuple(features.shape)} and {tuple(priors.shape)}")
    if features.shape[0] != priors.shape[0] or features.shape[2] != priors.shape[2]:
        raise ValueError(f"features {tuple(features.shape)} and priors {tuple(priors.shape)} "
                         "disagree on batch or width")
    if features.dtype != priors.dtype:
        raise TypeError(f"features dtype {features.dtype} != priors dtype {priors.dtype}")
    if features.device != priors.device:
        raise ValueError(f"features on {features.device}, priors on {priors.device}")
    if features.shape[1] < 1 or priors.shape[1] < 1:
        raise ValueError("features and priors need at least one token each")


FOLDS = ("auto", "always", "never")


#: Fewest voxels for which ``auto`` folds: below, the fold's fixed costs (the folded rows, their
#: backward, more small GEMMs) outweigh its per-voxel savings. CPU, one thread, C = 320, N = 26,
#: both sublayers, folded vs projected: 512 voxels (level 4 of a 128^3 crop) 0.98-1.03x
#: forward and 0.92-0.95x forward + backward; 640: 1.06-1.10x / 0.99-1.01x; 768: 1.11x / 1.11x.
FOLD_MIN_VOXELS = 640


def use_fold(heads: int, n: int, c: int, fold: str = "auto", length: int | None = None) -> bool:
    """Whether the folded formulation is used for ``heads`` heads, ``n`` priors, width ``c`` and
    ``length`` voxels (None: any number).

    The folded form costs ``2 H N C`` multiply-adds per voxel and GEMM pair against ``C I + N I``
    for the projected form (I ~ C), but it streams (no L x C projections kept for backward, no
    separate attention core). ``auto`` folds while ``H N <= 1.2 (C + N)`` (break-even measured
    on the CPU at Hermes shapes, whole block, one thread: with N = 26 (ratio 0.68-0.75) folding
    is 1.06-1.15x faster forward and 0.94-1.20x forward + backward, with less memory; at level 2
    with N = 82 (ratio 1.56) it is 0.90x forward + backward) and from ``FOLD_MIN_VOXELS``
    voxels; ``always`` / ``never`` force it.
    Without folding the sublayer runs the projected form: q/k/v projections and PyTorch's
    ``scaled_dot_product_attention`` or streamed over the voxels
    (:mod:`hermes.ops.prior_attention_projected`; :func:`choose_formulation` chooses).
    """
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
    if fold != "auto":
        return fold == "always"
    if length is not None and length < FOLD_MIN_VOXELS:
        return False
    return heads * n <= 1.2 * (c + n)


ATTENTION_CORES = ("sdpa", "math")


def _projected_cross_attention(x_q: Tensor, x_kv: Tensor, p: CrossAttentionParams,
                               core: str = "sdpa") -> Tensor:
    """``x_q + CrossAttn(LN(x_q), LN(x_kv))`` through projections (no folding) and ``core``:
    PyTorch's ``scaled_dot_product_attention`` or ``math`` (explicit scores, softmax, values:
    the official formulation)."""
    c = x_q.shape[-1]
    heads, d = _split_heads(p, c)
    q = F.linear(F.layer_norm(x_q, (c,), p.norm_q_weight, p.norm_q_bias, p.eps), p.w_q)
    kv = F.linear(F.layer_norm(x_kv, (c,), p.norm_kv_weight, p.norm_kv_bias, p.eps), p.w_kv)
    b, lq, lk = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k, v = kv.view(b, lk, 2, heads, d).permute(2, 0, 3, 1, 4)
    if core == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif core == "math":
        out = ((q * d**-0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
    else:
        raise ValueError(f"core must be one of {ATTENTION_CORES}, got {core!r}")
    return x_q + F.linear(out.transpose(1, 2).reshape(b, lq, heads * d), p.w_out, p.b_out)


#: Voxels from which unfolded sublayers stream (:mod:`hermes.ops.prior_attention_projected`)
#: instead of running through SDPA. CPU, N = 82, one thread: at level 2 (32,768 voxels)
#: streaming is 1.1-1.4x faster forward and 1.1x forward + backward, with a fraction of the
#: memory; at level 3 (4,096) about equal forward and 0.85x forward + backward, at level 4 (512)
#: 0.9x / 0.8x: small volumes keep SDPA (their projections are small anyway).
STREAM_MIN_VOXELS = 16384

#: GPUs, float32/float64, with gradients: voxels from which both sublayers use explicit
#: attention (``math``) rather than SDPA, whose float32 kernels slow down with the voxel count
#: at these shapes. H200, C = 128, ms, N = 26 (benchmarks/bench_prior_formulations.py),
#: forward + backward, math / SDPA: priors <- features 2.29 / 2.02 at 8,192 voxels, 2.24 / 3.08
#: at 13,824, 3.15 / 8.81 at 32,768; features <- priors 2.19 / 1.91, 1.82 / 2.84, 3.08 / 6.74
#: (N = 82 alike). The folded and streamed ops: 2.7-4.4 ms at these sizes.
GPU_MATH_MIN_VOXELS = 12288

#: The same without gradients, for priors <- features only (features <- priors keeps SDPA, the
#: faster there at every size: 0.17-0.40 against 0.24-0.55 ms). H200, C = 128, N = 26, math /
#: SDPA: 0.26 / 0.62 ms at 6,144 voxels, 0.50 / 1.33 at 13,824, 1.45 / 3.26 at 32,768; at C =
#: 256 and 4,096 voxels SDPA wins, 0.49 / 0.63.
GPU_MATH_MIN_VOXELS_FORWARD = 6144


def choose_formulation(side: str, length: int, n: int, c: int, heads: int, *,
                       device_type: str, dtype: torch.dtype, needs_grad: bool,
                       fold: str = "auto") -> str:
    """How a cross-attention sublayer runs: ``fold`` (:func:`prior_gather` /
    :func:`feature_scatter`), ``stream`` (:mod:`hermes.ops.prior_attention_projected`), ``sdpa``
    or ``math`` (projections, then PyTorch's SDPA or explicit attention).

    Args:
        side: ``"prior"`` (priors <- features) or ``"feature"`` (features <- priors).
        length, n, c, heads: voxels, priors, width and heads.
        device_type, dtype: of the features.
        needs_grad: whether any input or weight requires gradients.
        fold: ``auto`` (the measured choice), ``always`` (the folded op) or ``never``
            (projected: streamed from ``STREAM_MIN_VOXELS`` voxels without gradients or on the
            CPU, else SDPA).

    ``auto`` on the CPU folds where :func:`use_fold` says so, else as ``never``. On GPUs every
    streaming op is bound by host time at Hermes' shapes (H200: each sublayer's kernels take
    microseconds, the op's calls 0.6-1.7 ms forward and 2.8-5.9 ms forward + backward at every
    level, against SDPA's 0.2-0.5 / 1.5-2.5 ms, float32 at level 2 aside), so ``auto`` takes
    SDPA, or ``math`` in float32 and float64 where SDPA's kernels are slower: with gradients from
    ``GPU_MATH_MIN_VOXELS`` voxels, without from ``GPU_MATH_MIN_VOXELS_FORWARD`` for priors <-
    features. These thresholds were measured on one H200 and apply to every ``cuda`` device.
    ``dtype`` is the one the sublayer computes in (autocast's, where enabled).
    """
    if side not in ("prior", "feature"):
        raise ValueError(f"side must be 'prior' or 'feature', got {side!r}")
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
    if fold == "auto" and device_type == "cuda":
        if dtype not in (torch.float32, torch.float64):
            return "sdpa"
        if needs_grad:
            return "math" if length >= GPU_MATH_MIN_VOXELS else "sdpa"
        if side == "prior" and length >= GPU_MATH_MIN_VOXELS_FORWARD:
            return "math"
        return "sdpa"
    if use_fold(heads, n, c, fold, length):
        return "fold"
    if length >= STREAM_MIN_VOXELS and (not needs_grad or device_type == "cpu"):
        return "stream"
    return "sdpa"


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the projections of ``t`` compute in: autocast's where it is on for ``t``'s
    device (float32 tokens then run their GEMMs in bfloat16/float16), else ``t``'s."""
    device = t.device.type
    if (t.is_floating_point() and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _formulation(side: str, features: Tensor, priors: Tensor, p: CrossAttentionParams,
                 fold: str) -> str:
    weights = (v for v in vars(p).values() if isinstance(v, Tensor))
    return choose_formulation(side, features.shape[1], priors.shape[1], priors.shape[2],
                              p.heads, device_type=features.device.type,
                              dtype=_compute_dtype(features),
                              needs_grad=_needs_grad(features, priors, *weights), fold=fold)


def prior_cross_attention_fused(features: Tensor, priors: Tensor, p: CrossAttentionParams,
                                chunk: int | None = None, fold: str = "auto") -> Tensor:
    """``priors + CrossAttn(LN(priors), LN(features))`` -> B x N x C, formulated as
    :func:`choose_formulation` says for ``fold``."""
    check_block_inputs(features, priors)
    form = _formulation("prior", features, priors, p, fold)
    if form in ATTENTION_CORES:
        return _projected_cross_attention(priors, features, p, form)
    if form == "stream":
        return _projected.prior_cross_attention_projected(features, priors, p, chunk)
    dt = features.dtype  # folds and norms follow the features (autocast runs F.linear in half)
    a = fold_prior_queries(priors, p).to(dt)
    z = prior_gather(features, a, p.norm_kv_weight.to(dt), p.norm_kv_bias.to(dt), p.eps, chunk)
    return _unfold_prior_values(z, priors, p)


def feature_cross_attention_fused(features: Tensor, priors: Tensor, p: CrossAttentionParams,
                                  chunk: int | None = None, fold: str = "auto") -> Tensor:
    """``features + CrossAttn(LN(features), LN(priors))`` -> B x L x C, formulated as
    :func:`choose_formulation` says for ``fold``."""
    check_block_inputs(features, priors)
    form = _formulation("feature", features, priors, p, fold)
    if form in ATTENTION_CORES:
        return _projected_cross_attention(features, priors, p, form)
    if form == "stream":
        return _projected.feature_cross_attention_projected(features, priors, p, chunk)
    dt = features.dtype
    a, v = fold_feature_keys_values(priors, p)
    return feature_scatter(features, a.to(dt), v.to(dt), p.norm_q_weight.to(dt),
                           p.norm_q_bias.to(dt), p.b_out.to(dt), p.heads, p.eps, chunk)


#: Fewest hidden activations (B x L x 4C elements) for which the CPU runs the feature MLP as the
#: streaming op by default; below, PyTorch's layers are as small and faster. CPU, one thread,
#: streaming / PyTorch: level 4 of a 128^3 crop (512 x 1,280) forward 9.3 / 8.5 ms, forward +
#: backward 27.0 / 26.0 ms, block peak memory (forward + backward) 15.0 / 14.7 MiB (20.1 when
#: the stream kept its hidden layer for the backward); level 3 (4,096 x 1,024) forward 47 / 51
#: ms, forward + backward 154 / 139 ms with 23 / 62 MiB: streams, for the memory.
MLP_STREAM_MIN = 1 << 20


def feature_mlp_fused(features: Tensor, p: MLPParams, chunk: int | None = None,
                      streamed: bool | None = None) -> Tensor:
    """``features + MLP(LN(features))`` -> B x L x C: the streaming op (:func:`feature_mlp`)
    or, with ``streamed=False``, PyTorch's layers (the hidden layer kept for backward). None:
    streaming on the CPU from ``MLP_STREAM_MIN`` hidden activations, else PyTorch's layers; on
    GPUs PyTorch's layers, 1.4-2.6x faster there (H200, levels 2-4, float32 and bfloat16:
    forward 0.11-0.33 against 0.24-0.48 ms, forward + backward 0.74-1.59 against 1.68-3.30 ms;
    benchmarks/bench_prior_formulations.py), where memory is rarely short: the hidden layer of
    a 128^3 crop's level 2 is 64 MiB in float32."""
    if streamed is None:
        hidden = math.prod(features.shape[:-1]) * p.w1.shape[0]
        streamed = features.device.type != "cuda" and hidden > MLP_STREAM_MIN
    return feature_mlp(features, p, chunk) if streamed else mlp_sublayer(features, p)


def prior_attention_block_fused(features: Tensor, priors: Tensor, p: PriorBlockParams,
                                chunk: int | None = None, fold: str | None = None,
                                streamed_mlp: bool | None = None) -> tuple[Tensor, Tensor]:
    """One Hermes attention block, fused; same contract as the reference.

    Args:
        features: B x L x C voxel tokens (any strides).
        priors: B x N x C prior tokens.
        p: the block's weights.
        chunk: voxels per streaming chunk (default: :func:`default_chunk`).
        fold: formulation of the cross-attention sublayers (:func:`choose_formulation`);
            default ``$HERMES_PRIOR_FOLD`` or ``auto``.
        streamed_mlp: the feature MLP as the streaming op or PyTorch's layers
            (:func:`feature_mlp_fused`); None: streaming where ``fold`` is ``always``, else the
            device's default.
    Returns:
        (features, priors) updated, B x L x C and B x N x C.
    """
    check_block_inputs(features, priors)
    fold = fold if fold is not None else os.environ.get("HERMES_PRIOR_FOLD", "auto")
    if streamed_mlp is None and fold == "always":
        streamed_mlp = True
    priors = prior_cross_attention_fused(features, priors, p.prior_attn, chunk, fold)
    priors = mlp_sublayer(priors, p.prior_mlp)
    features = feature_cross_attention_fused(features, priors, p.feat_attn, chunk, fold)
    features = feature_mlp_fused(features, p.feat_mlp, chunk, streamed_mlp)
    return features, priors


_ = TorchKernels  # re-exported for tests that force the PyTorch element-wise path


# last, as it imports from this module: defines the projected sublayers' custom ops, so that
# importing this module registers every hermes:: prior op (torch.compile, loaded graphs)
from hermes.ops import prior_attention_projected as _projected  # noqa: E402
