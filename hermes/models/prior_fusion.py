"""Prior pool, oracle-guided prior selection and the prior-feature interaction layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hermes.ops.prior_attention import (
    ATTN_NORM_EPS,
    MLP_NORM_EPS,
    CrossAttentionParams,
    MLPParams,
    PriorBlockParams,
    prior_attention_block_reference,
)


class CrossAttentionWeights(nn.Module):
    """Projections of one cross-attention: q (no bias), kv (no bias), out (with bias)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, dim)


class MLPWeights(nn.Module):
    """Linear(C, 4C) -> GELU -> Linear(4C, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class PriorAttentionBlock(nn.Module):
    """Weights of one Hermes attention block (priors <- features, then features <- priors).

    The computation lives in :mod:`hermes.ops.prior_attention`; this module only owns parameters
    and hands them over as :class:`PriorBlockParams`.
    """

    def __init__(self, dim: int, head_dim: int = 32, mlp_ratio: int = 4) -> None:
        super().__init__()
        heads = dim // head_dim
        if heads < 1:
            raise ValueError(f"width {dim} is smaller than the attention head width {head_dim}")
        self.prior_attn_norm_q = nn.LayerNorm(dim, eps=ATTN_NORM_EPS)
        self.prior_attn_norm_kv = nn.LayerNorm(dim, eps=ATTN_NORM_EPS)
        self.prior_attn = CrossAttentionWeights(dim, heads, head_dim)
        self.prior_mlp_norm = nn.LayerNorm(dim, eps=MLP_NORM_EPS)
        self.prior_mlp = MLPWeights(dim, mlp_ratio * dim)
        self.feat_attn_norm_q = nn.LayerNorm(dim, eps=ATTN_NORM_EPS)
        self.feat_attn_norm_kv = nn.LayerNorm(dim, eps=ATTN_NORM_EPS)
        self.feat_attn = CrossAttentionWeights(dim, heads, head_dim)
        self.feat_mlp_norm = nn.LayerNorm(dim, eps=MLP_NORM_EPS)
        self.feat_mlp = MLPWeights(dim, mlp_ratio * dim)

    @staticmethod
    def _attn(norm_q: nn.LayerNorm, norm_kv: nn.LayerNorm, w: CrossAttentionWeights):
        return CrossAttentionParams(
            norm_q.weight, norm_q.bias, norm_kv.weight, norm_kv.bias,
            w.q.weight, w.kv.weight, w.out.weight, w.out.bias, w.heads, norm_q.eps,
        )

    @staticmethod
    def _mlp(norm: nn.LayerNorm, w: MLPWeights) -> MLPParams:
        return MLPParams(
            norm.weight, norm.bias, w.fc1.weight, w.fc1.bias, w.fc2.weight, w.fc2.bias, norm.eps
        )

    def params(self) -> PriorBlockParams:
        """The block's weights as the op-level parameter bundle."""
        return PriorBlockParams(
            prior_attn=self._attn(self.prior_attn_norm_q, self.prior_attn_norm_kv, self.prior_attn),
            prior_mlp=self._mlp(self.prior_mlp_norm, self.prior_mlp),
            feat_attn=self._attn(self.feat_attn_norm_q, self.feat_attn_norm_kv, self.feat_attn),
            feat_mlp=self._mlp(self.feat_mlp_norm, self.feat_mlp),
        )

    def forward(self, features: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
        """features B x L x C, priors B x N x C -> both updated.

        Runs the fused op (:mod:`hermes.ops.prior_attention_fused`) unless the implementation is
        ``"reference"``: per block through an ``impl`` attribute (set model-wide with
        :func:`hermes.ops.prior_attention_fused.set_prior_impl`), else the environment variable
        ``HERMES_PRIOR_IMPL`` (``fused`` by default).
        """
        from hermes.ops.prior_attention_fused import prior_attention_block_fused, resolve_impl

        if resolve_impl(getattr(self, "impl", None)) == "fused":
            return prior_attention_block_fused(features, priors, self.params())
        return prior_attention_block_reference(features, priors, self.params())


class PriorFeatureInteraction(nn.Module):
    """A stack of attention blocks exchanging information between voxel features and priors.

    This is the single interface behind which the fused kernels replace the reference:
    ``forward(features: B x C x D x H x W, priors: B x N x C) -> (features, priors)``.
    """

    def __init__(self, dim: int, depth: int, head_dim: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PriorAttentionBlock(dim, head_dim) for _ in range(depth))

    def forward(self, features: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
        from hermes.ops.prior_attention_fused import resolve_impl

        b, c, d, h, w = features.shape
        tokens = features.reshape(b, c, d * h * w).transpose(1, 2)  # B x L x C view
        if any(resolve_impl(getattr(blk, "impl", None)) == "fused" for blk in self.blocks):
            tokens = tokens.contiguous()  # one copy here instead of one per fused op
        for block in self.blocks:
            tokens, priors = block(tokens, priors)
        features = tokens.transpose(1, 2).reshape(b, c, d, h, w).contiguous()
        return features, priors


class PriorFusionLayer(nn.Module):
    """One level's prior pool plus its interaction with that level's feature map.

    Parameters: ``task_priors`` (T + 1) x C (the last row is the null token) and
    ``modality_priors`` M x K x C, both xavier-uniform initialised.
    """

    def __init__(
        self, dim: int, num_tasks: int, num_modalities: int, modality_tokens: int, depth: int,
        head_dim: int = 32,
    ) -> None:
        super().__init__()
        self.task_priors = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_tasks + 1, dim)))
        self.modality_priors = nn.Parameter(
            nn.init.xavier_uniform_(torch.empty(num_modalities, modality_tokens, dim))
        )
        self.interaction = PriorFeatureInteraction(dim, depth, head_dim)

    def select(self, task_idx: Tensor, modality_idx: Tensor) -> Tensor:
        """Oracle-guided selection.

        Args:
            task_idx: B x T long, -1 selects the null token.
            modality_idx: B long (-1 selects the last modality row, as the official model).
        Returns:
            B x (T + K) x C: the selected task tokens followed by the modality's K tokens.
        """
        tasks = self.task_priors[task_idx.remainder(self.task_priors.shape[0])]
        mods = self.modality_priors[modality_idx.remainder(self.modality_priors.shape[0])]
        return torch.cat([tasks, mods], dim=1)

    def forward(
        self, features: Tensor, task_idx: Tensor, modality_idx: Tensor
    ) -> tuple[Tensor, Tensor]:
        """features B x C x D x H x W -> (features, posterior priors B x (T + K) x C)."""
        priors = self.select(task_idx, modality_idx).to(features.dtype)
        return self.interaction(features, priors)
