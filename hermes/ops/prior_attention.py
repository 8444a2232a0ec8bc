"""Prior-feature interaction: the pure-PyTorch reference of one Hermes attention block.

One block updates the prior tokens from the voxel features and then the voxel features from the
priors (see ``../shared/hermes-architecture.md``)::

    priors   += CrossAttn(LN(priors), LN(features))   # N prior queries over L voxel keys
    priors   += MLP(LN(priors))                        # hidden 4C, GELU
    features += CrossAttn(LN(features), LN(priors))   # L voxel queries over N prior keys
    features += MLP(LN(features))

Shapes: ``features`` is B x L x C (voxels flattened, channels last), ``priors`` B x N x C.
Cross-attention uses ``heads = C // head_dim`` heads of width ``head_dim`` (inner width
``heads * head_dim``, which may be smaller than C, as in the official model), q without bias,
k/v from one bias-free projection, and an output projection with bias.

The functions here are written with plain matmul/softmax, independent of any fused kernel, so they
serve as the test oracle and as the fallback wherever no kernel exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_NORM_EPS = 1e-5
MLP_NORM_EPS = 1e-4


@dataclass
class CrossAttentionParams:
    """Weights of one pre-normed cross-attention sublayer (query side ``q``, key/value ``kv``).

    Shapes (C = model width, I = heads * head_dim): ``norm_q_weight``/``norm_q_bias`` C,
    ``norm_kv_weight``/``norm_kv_bias`` C, ``w_q`` I x C, ``w_kv`` 2I x C (keys then values),
    ``w_out`` C x I, ``b_out`` C.
    """

    norm_q_weight: Tensor
    norm_q_bias: Tensor
    norm_kv_weight: Tensor
    norm_kv_bias: Tensor
    w_q: Tensor
    w_kv: Tensor
    w_out: Tensor
    b_out: Tensor
    heads: int
    eps: float = ATTN_NORM_EPS


@dataclass
class MLPParams:
    """Weights of one pre-normed MLP sublayer: LN -> Linear(C, H) -> GELU -> Linear(H, C).

    Shapes: ``norm_weight``/``norm_bias`` C, ``w1`` H x C, ``b1`` H, ``w2`` C x H, ``b2`` C.
    """

    norm_weight: Tensor
    norm_bias: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    eps: float = MLP_NORM_EPS


@dataclass
class PriorBlockParams:
    """The four sublayers of one attention block, in execution order."""

    prior_attn: CrossAttentionParams
    prior_mlp: MLPParams
    feat_attn: CrossAttentionParams
    feat_mlp: MLPParams


def cross_attention_sublayer(x_q: Tensor, x_kv: Tensor, p: CrossAttentionParams) -> Tensor:
    """Return ``x_q + CrossAttn(LN(x_q), LN(x_kv))``.

    Args:
        x_q: B x Lq x C queries.
        x_kv: B x Lk x C keys/values source.
    Returns:
        B x Lq x C.
    """
    c = x_q.shape[-1]
    q_in = F.layer_norm(x_q, (c,), p.norm_q_weight, p.norm_q_bias, p.eps)
    kv_in = F.layer_norm(x_kv, (c,), p.norm_kv_weight, p.norm_kv_bias, p.eps)
    q = q_in @ p.w_q.t()
    k, v = (kv_in @ p.w_kv.t()).chunk(2, dim=-1)
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // p.heads
    q = q.view(b, lq, p.heads, d).transpose(1, 2)
    k = k.view(b, lk, p.heads, d).transpose(1, 2)
    v = v.view(b, lk, p.heads, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * (d**-0.5)
    attn = torch.softmax(scores, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, lq, inner)
    return x_q + F.linear(out, p.w_out, p.b_out)


def mlp_sublayer(x: Tensor, p: MLPParams) -> Tensor:
    """Return ``x + fc2(GELU(fc1(LN(x))))`` for x of shape B x L x C (exact erf GELU)."""
    h = F.layer_norm(x, (x.shape[-1],), p.norm_weight, p.norm_bias, p.eps)
    h = F.gelu(F.linear(h, p.w1, p.b1))
    return x + F.linear(h, p.w2, p.b2)


def prior_attention_block_reference(
    features: Tensor, priors: Tensor, p: PriorBlockParams
) -> tuple[Tensor, Tensor]:
    """One Hermes attention block, reference implementation.

    Args:
        features: B x L x C voxel tokens.
        priors: B x N x C prior tokens (task tokens, null tokens and modality tokens).
    Returns:
        (features, priors), updated, same shapes.
    """
    priors = cross_attention_sublayer(priors, features, p.prior_attn)
    priors = mlp_sublayer(priors, p.prior_mlp)
    features = cross_attention_sublayer(features, priors, p.feat_attn)
    features = mlp_sublayer(features, p.feat_mlp)
    return features, priors
