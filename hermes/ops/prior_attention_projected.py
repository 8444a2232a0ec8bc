"""Streamed projected cross-attention, where folding does not pay.

With many priors (``H N > 1.2 (C + N)``, e.g. N = 82) the folded form of
:mod:`hermes.ops.prior_attention_fused` costs more multiply-adds than the projected one, so the
sublayers keep the q/k/v projections. These ops stream the voxels in chunks: per chunk LayerNorm
-> projection GEMM -> per-head score GEMMs -> softmax (online over L for priors <- features) ->
per-head value GEMMs, so no L x 2I key/value or L x I query/output tensor is ever materialised;
the backward recomputes them per chunk from the saved log-sum-exp (flash-style). CPU, level 2,
N = 82: forward 1.1-1.4x and forward + backward 1.1x faster than the SDPA formulation, with a
fraction of its memory; at small L (levels 3 and 4) SDPA is as fast or faster, so
:func:`hermes.ops.prior_attention_fused.choose_formulation` keeps it there (GPUs run SDPA or
explicit attention).

Notation as in :mod:`hermes.ops.prior_attention_fused`: L voxels, N priors, C width, H heads of
width d, I = H d, M = H N; queries are pre-scaled by ``d ** -0.5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hermes.ops.prior_attention import CrossAttentionParams
from hermes.ops.prior_attention_fused import (
    _acc_dtype,
    _addmm_acc,
    _chunks,
    _dense,
    _fresh,
    _kern,
    _split_heads,
    _sum_chunk,
    _Workspace,
)

__all__ = ["prior_cross_attention_projected", "feature_cross_attention_projected"]


def _baddbmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b (batched) with acc possibly wider (float32 accumulators of half inputs)."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b).to(acc.dtype))


@torch.library.custom_op("hermes::prior_gather_proj_fwd", mutates_args=())
def prior_gather_proj_fwd(
    features: Tensor, q: Tensor, w_kv: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    eps: float, chunk: int,
) -> tuple[Tensor, Tensor]:
    """features B x L x C, q B x H x N x d (scaled), w_kv 2I x C -> (attention output
    B x H x N x d: softmax over L of ``q_h . k_h`` times ``v_h`` with ``[k, v] = LN(features)
    w_kv^T``; its log-sum-exp B x (H*N), float32/64)."""
    features, q, w_kv, norm_weight, norm_bias = _dense(features, q, w_kv, norm_weight, norm_bias)
    k = _kern(features)
    b, length, c = features.shape
    _, heads, n, d = q.shape
    inner, m_rows = heads * d, heads * n
    sd = torch.float64 if features.dtype == torch.float64 else torch.float32
    acc_t = _acc_dtype(features)
    out = torch.empty(b, heads, n, d, dtype=features.dtype, device=features.device)
    lse = torch.empty(b, m_rows, dtype=sd, device=features.device)
    w_kv_t = w_kv.t()
    ws = _Workspace(features)
    for i in range(b):
        run_max = torch.full((m_rows,), -math.inf, dtype=sd, device=features.device)
        run_sum = torch.zeros(m_rows, dtype=sd, device=features.device)
        acc = torch.zeros(heads, n, d, dtype=acc_t, device=features.device)
        for s0, s1 in _chunks(length, chunk):
            r = s1 - s0
            x, _, _ = k.ln_fwd(features[i, s0:s1], norm_weight, norm_bias, eps,
                               out=ws.get("x", r, c))
            kv = torch.mm(x, w_kv_t, out=ws.get("kv", r, 2 * inner))
            keys = kv[:, :inner].view(r, heads, d).permute(1, 2, 0)  # H x d x r
            values = kv[:, inner:].view(r, heads, d).permute(1, 0, 2)  # H x r x d
            s = torch.bmm(q[i], keys, out=ws.get("s", heads, n, r))
            alpha = k.online_update(s.view(m_rows, r), run_max, run_sum)
            if s0 > 0:
                acc.mul_(alpha.to(acc_t).view(heads, n, 1))
            _baddbmm_acc(acc, s, values)
        out[i] = (acc / run_sum.to(acc_t).view(heads, n, 1)).to(out.dtype)
        lse[i] = run_max + torch.log(run_sum)
    return out, lse


@prior_gather_proj_fwd.register_fake
def _(features, q, w_kv, norm_weight, norm_bias, eps, chunk):
    sd = torch.float64 if features.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[0], q.shape[1] * q.shape[2], dtype=sd)


@torch.library.custom_op("hermes::prior_gather_proj_bwd", mutates_args=())
def prior_gather_proj_bwd(
    grad_o: Tensor, features: Tensor, q: Tensor, w_kv: Tensor, norm_weight: Tensor,
    norm_bias: Tensor, o: Tensor, lse: Tensor, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (features, q, w_kv, norm_weight, norm_bias) of :func:`prior_gather_proj_fwd`:
    keys, values and probabilities recomputed per chunk from the saved log-sum-exp."""
    grad_o, features, q, w_kv, norm_weight, norm_bias, o, lse = _dense(
        grad_o, features, q, w_kv, norm_weight, norm_bias, o, lse)
    k = _kern(features)
    b, length, c = features.shape
    _, heads, n, d = q.shape
    inner, m_rows = heads * d, heads * n
    acc_t = _acc_dtype(features)
    dev = features.device
    d_feat = torch.empty_like(features)
    d_q = torch.zeros(q.shape, dtype=acc_t, device=dev)
    d_w_kv = torch.zeros(w_kv.shape, dtype=acc_t, device=dev)
    d_w = torch.zeros(c, dtype=acc_t, device=dev)
    d_b = torch.zeros(c, dtype=acc_t, device=dev)
    dsum = (grad_o.to(lse.dtype) * o.to(lse.dtype)).sum(-1).view(b, m_rows)
    w_kv_t = w_kv.t()
    ws = _Workspace(features)
    for i in range(b):
        q_t, g_t = q[i].transpose(1, 2), grad_o[i].transpose(1, 2)  # H x d x N
        for s0, s1 in _chunks(length, chunk):
            r = s1 - s0
            xin = features[i, s0:s1]
            x, mean, rstd = k.ln_fwd(xin, norm_weight, norm_bias, eps, out=ws.get("x", r, c))
            kv = torch.mm(x, w_kv_t, out=ws.get("kv", r, 2 * inner))
            keys = kv[:, :inner].view(r, heads, d).permute(1, 2, 0)  # H x d x r
            values = kv[:, inner:].view(r, heads, d).permute(1, 2, 0)  # H x d x r
            s = torch.bmm(q[i], keys, out=ws.get("s", heads, n, r))
            dp = torch.bmm(grad_o[i], values, out=ws.get("dp", heads, n, r))
            k.gather_bwd(s.view(m_rows, r), dp.view(m_rows, r), lse[i], dsum[i])  # P, dS
            _baddbmm_acc(d_q[i], dp, keys.transpose(1, 2))
            # [dK; dV] transposed, 2I x r: dK_h^T = q_h^T dS_h, dV_h^T = dO_h^T P_h
            dkv_t = ws.get("dkv_t", 2 * heads, d, r)
            torch.bmm(q_t, dp, out=dkv_t[:heads])
            torch.bmm(g_t, s, out=dkv_t[heads:])
            dkv_t = dkv_t.view(2 * inner, r)
            _addmm_acc(d_w_kv, dkv_t, x)
            dx = torch.mm(dkv_t.t(), w_kv, out=ws.get("dx", r, c))
            k.ln_bwd(dx, xin, mean, rstd, norm_weight, d_feat[i, s0:s1], d_w, d_b, False)
    return (d_feat, d_q.to(q.dtype), d_w_kv.to(w_kv.dtype), d_w.to(norm_weight.dtype),
            d_b.to(norm_bias.dtype))


@prior_gather_proj_bwd.register_fake
def _(grad_o, features, q, w_kv, norm_weight, norm_bias, o, lse, eps, chunk):
    return _fresh(features, q, w_kv, norm_weight, norm_bias)


def _pgp_setup(ctx, inputs, output):
    features, q, w_kv, norm_weight, norm_bias, eps, chunk = inputs
    o, lse = output
    ctx.save_for_backward(features, q, w_kv, norm_weight, norm_bias, o, lse)
    ctx.eps, ctx.chunk = eps, chunk
    ctx.mark_non_differentiable(lse)


def _pgp_backward(ctx, grad_o, grad_lse):
    features, q, w_kv, norm_weight, norm_bias, o, lse = ctx.saved_tensors
    if grad_o is None:
        return None, None, None, None, None, None, None
    grads = prior_gather_proj_bwd(grad_o, features, q, w_kv, norm_weight, norm_bias, o, lse,
                                  ctx.eps, ctx.chunk)
    return (*grads, None, None)


prior_gather_proj_fwd.register_autograd(_pgp_backward, setup_context=_pgp_setup)


def _attend_scores(k, ws: _Workspace, xin: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                   eps: float, w_q: Tensor, keys_t: Tensor) -> tuple[Tensor, ...]:
    """One chunk of features <- priors up to the raw scores, for the forward and the backward's
    recompute alike: xin r x C, w_q I x C, keys_t H x N x d -> (LN(xin) r x C, its mean and
    rstd, queries transposed H x d x r, scores H x N x r), in ``ws`` buffers. Voxels last: the
    softmax over each head's priors runs along contiguous voxels and no per-chunk transposing
    copy is needed."""
    r, c = xin.shape
    heads, n, d = keys_t.shape
    x, mean, rstd = k.ln_fwd(xin, norm_weight, norm_bias, eps, out=ws.get("x", r, c))
    q_t = torch.mm(w_q, x.t(), out=ws.get("q_t", heads * d, r)).view(heads, d, r)
    s = torch.bmm(keys_t, q_t, out=ws.get("s", heads, n, r))
    return x, mean, rstd, q_t, s


@torch.library.custom_op("hermes::feature_attend_proj_fwd", mutates_args=())
def feature_attend_proj_fwd(
    features: Tensor, keys: Tensor, values: Tensor, w_q: Tensor, w_out: Tensor, b_out: Tensor,
    norm_weight: Tensor, norm_bias: Tensor, eps: float, chunk: int,
) -> Tensor:
    """features B x L x C, keys B x H x d x N (scaled), values B x H x N x d, w_q I x C,
    w_out C x I -> ``features + (softmax_N(q_h keys_h) values_h)_h w_out^T + b_out`` with
    ``q = LN(features) w_q^T`` (B x L x C)."""
    features, keys, values, w_q, w_out, b_out, norm_weight, norm_bias = _dense(
        features, keys, values, w_q, w_out, b_out, norm_weight, norm_bias)
    k = _kern(features)
    b, length, c = features.shape
    _, heads, d, n = keys.shape
    inner = heads * d
    out = torch.empty_like(features)
    w_out_t = w_out.t()
    ws = _Workspace(features)
    for i in range(b):
        keys_t = keys[i].transpose(1, 2)  # H x N x d
        values_t = values[i].transpose(1, 2)  # H x d x N
        for s0, s1 in _chunks(length, chunk):
            r = s1 - s0
            *_, s = _attend_scores(k, ws, features[i, s0:s1], norm_weight, norm_bias, eps, w_q,
                                   keys_t)
            k.head_softmax(s.view(heads * n, r), heads)
            o_t = torch.bmm(values_t, s, out=ws.get("o_t", heads, d, r))
            dst = out[i, s0:s1]
            torch.addmm(features[i, s0:s1], o_t.view(inner, r).t(), w_out_t, out=dst)
            dst.add_(b_out)
    return out


@feature_attend_proj_fwd.register_fake
def _(features, keys, values, w_q, w_out, b_out, norm_weight, norm_bias, eps, chunk):
    return features.new_empty(features.shape)


@torch.library.custom_op("hermes::feature_attend_proj_bwd", mutates_args=())
def feature_attend_proj_bwd(
    grad_out: Tensor, features: Tensor, keys: Tensor, values: Tensor, w_q: Tensor, w_out: Tensor,
    norm_weight: Tensor, norm_bias: Tensor, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (features, keys, values, w_q, w_out, b_out, norm_weight, norm_bias) of
    :func:`feature_attend_proj_fwd`: queries and probabilities recomputed per chunk."""
    grad_out, features, keys, values, w_q, w_out, norm_weight, norm_bias = _dense(
        grad_out, features, keys, values, w_q, w_out, norm_weight, norm_bias)
    k = _kern(features)
    b, length, c = features.shape
    _, heads, d, n = keys.shape
    inner = heads * d
    acc_t = _acc_dtype(features)
    dev = features.device
    d_feat = grad_out.clone()  # residual
    d_keys = torch.zeros(keys.shape, dtype=acc_t, device=dev)
    d_values = torch.zeros(values.shape, dtype=acc_t, device=dev)
    d_w_q = torch.zeros(w_q.shape, dtype=acc_t, device=dev)
    d_w_out_t = torch.zeros(inner, c, dtype=acc_t, device=dev)
    d_w = torch.zeros(c, dtype=acc_t, device=dev)
    d_b = torch.zeros(c, dtype=acc_t, device=dev)
    d_b_out = grad_out.to(acc_t).sum((0, 1))
    ws = _Workspace(features)
    for i in range(b):
        keys_t = keys[i].transpose(1, 2)  # H x N x d
        values_t = values[i].transpose(1, 2)  # H x d x N
        for s0, s1 in _chunks(length, chunk):
            r = s1 - s0
            xin, g = features[i, s0:s1], grad_out[i, s0:s1]
            x, mean, rstd, q_t, s = _attend_scores(k, ws, xin, norm_weight, norm_bias, eps, w_q,
                                                   keys_t)
            d_o_t = torch.mm(w_out.t(), g.t(), out=ws.get("d_o_t", inner, r)).view(heads, d, r)
            dp = torch.bmm(values[i], d_o_t, out=ws.get("dp", heads, n, r))
            k.head_softmax_bwd(s.view(heads * n, r), dp.view(heads * n, r), heads)  # P, dS
            o_t = torch.bmm(values_t, s, out=ws.get("o_t", heads, d, r))
            _addmm_acc(d_w_out_t, o_t.view(inner, r), g)
            dq_t = torch.bmm(keys[i], dp, out=ws.get("dq_t", heads, d, r)).view(inner, r)
            _addmm_acc(d_w_q, dq_t, x)
            _baddbmm_acc(d_keys[i], q_t, dp.transpose(1, 2))
            _baddbmm_acc(d_values[i], s, d_o_t.transpose(1, 2))
            dx = torch.mm(dq_t.t(), w_q, out=ws.get("dx", r, c))
            k.ln_bwd(dx, xin, mean, rstd, norm_weight, d_feat[i, s0:s1], d_w, d_b, True)
    d_w_out = d_w_out_t.t().contiguous()  # the fake kernel's (and autograd's) layout
    return (d_feat, d_keys.to(keys.dtype), d_values.to(values.dtype), d_w_q.to(w_q.dtype),
            d_w_out.to(w_out.dtype), d_b_out.to(w_out.dtype), d_w.to(norm_weight.dtype),
            d_b.to(norm_bias.dtype))


@feature_attend_proj_bwd.register_fake
def _(grad_out, features, keys, values, w_q, w_out, norm_weight, norm_bias, eps, chunk):
    return (*_fresh(features, keys, values, w_q, w_out), w_out.new_empty(w_out.shape[0]),
            *_fresh(norm_weight, norm_bias))


def _fap_setup(ctx, inputs, output):
    features, keys, values, w_q, w_out, b_out, norm_weight, norm_bias, eps, chunk = inputs
    ctx.save_for_backward(features, keys, values, w_q, w_out, norm_weight, norm_bias)
    ctx.eps, ctx.chunk = eps, chunk


def _fap_backward(ctx, grad_out):
    features, keys, values, w_q, w_out, norm_weight, norm_bias = ctx.saved_tensors
    d_f, d_k, d_v, d_wq, d_wo, d_bo, d_nw, d_nb = feature_attend_proj_bwd(
        grad_out, features, keys, values, w_q, w_out, norm_weight, norm_bias, ctx.eps, ctx.chunk)
    return d_f, d_k, d_v, d_wq, d_wo, d_bo, d_nw, d_nb, None, None


feature_attend_proj_fwd.register_autograd(_fap_backward, setup_context=_fap_setup)


def prior_cross_attention_projected(features: Tensor, priors: Tensor, p: CrossAttentionParams,
                                    chunk: int | None = None) -> Tensor:
    """``priors + CrossAttn(LN(priors), LN(features))`` -> B x N x C, streamed.

    Args:
        features: B x L x C voxel tokens (keys and values).
        priors: B x N x C prior tokens (queries).
        p: the sublayer's weights.
        chunk: voxels per streaming chunk (default :func:`default_chunk`).
    """
    b, n, c = priors.shape
    heads, d = _split_heads(p, c)
    dt = features.dtype
    pq = F.layer_norm(priors, (c,), p.norm_q_weight, p.norm_q_bias, p.eps)
    q = (F.linear(pq, p.w_q) * d**-0.5).view(b, n, heads, d).transpose(1, 2).to(dt)
    chunk = _sum_chunk(features, max(2 * heads * d, heads * n, c), chunk)
    o, _ = prior_gather_proj_fwd(
        features.contiguous(), q.contiguous(), p.w_kv.to(dt).contiguous(),
        p.norm_kv_weight.to(dt).contiguous(), p.norm_kv_bias.to(dt).contiguous(), float(p.eps),
        int(chunk))
    o = o.transpose(1, 2).reshape(b, n, heads * d).to(priors.dtype)
    return priors + F.linear(o, p.w_out, p.b_out)


def feature_cross_attention_projected(features: Tensor, priors: Tensor, p: CrossAttentionParams,
                                      chunk: int | None = None) -> Tensor:
    """``features + CrossAttn(LN(features), LN(priors))`` -> B x L x C, streamed.

    Args:
        features: B x L x C voxel tokens (queries).
        priors: B x N x C prior tokens (keys and values).
        p: the sublayer's weights.
        chunk: voxels per streaming chunk (default :func:`default_chunk`).
    """
    b, n, c = priors.shape
    heads, d = _split_heads(p, c)
    dt = features.dtype
    pk = F.layer_norm(priors, (c,), p.norm_kv_weight, p.norm_kv_bias, p.eps)
    kv = F.linear(pk, p.w_kv).view(b, n, 2, heads, d)
    keys = (kv[:, :, 0] * d**-0.5).permute(0, 2, 3, 1).to(dt)  # B x H x d x N
    values = kv[:, :, 1].transpose(1, 2).to(dt)  # B x H x N x d
    chunk = _sum_chunk(features, max(heads * n, heads * d, c), chunk)
    return feature_attend_proj_fwd(
        features.contiguous(), keys.contiguous(), values.contiguous(), p.w_q.to(dt).contiguous(),
        p.w_out.to(dt).contiguous(), p.b_out.to(dt).contiguous(),
        p.norm_q_weight.to(dt).contiguous(), p.norm_q_bias.to(dt).contiguous(), float(p.eps),
        int(chunk))
