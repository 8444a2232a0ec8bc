"""Output heads: the hierarchical prior classifier and the modality classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HierarchicalPriorClassifier(nn.Module):
    """Turns each task's posterior tokens from all levels into a per-task 1x1x1 classifier.

    ``concat(levels) (sum of widths) -> LayerNorm -> [Linear, GELU, Linear] -> [Linear, GELU,
    Linear]`` gives a ``width``-dim vector per task; the task's logit at each voxel is its dot
    product with the full-resolution decoder features (no bias).
    """

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.fc2 = nn.Linear(in_dim, width)
        self.fc3 = nn.Linear(width, width)
        self.fc4 = nn.Linear(width, width)
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, task_tokens: list[Tensor]) -> Tensor:
        """features B x width x D x H x W, task_tokens per level B x T x C_l.

        Returns logits B x T x D x H x W.
        """
        t = self.norm(torch.cat(task_tokens, dim=2))
        t = self.fc2(F.gelu(self.fc1(t)))
        t = self.fc4(F.gelu(self.fc3(t)))  # B x T x width
        b, c = features.shape[:2]
        logits = torch.bmm(t.to(features.dtype), features.reshape(b, c, -1))
        return logits.view(b, t.shape[1], *features.shape[2:])


class ModalityClassifier(nn.Module):
    """concat(levels) -> LayerNorm -> mean over modality tokens -> [Linear, GELU, Linear] -> M."""

    def __init__(self, in_dim: int, num_modalities: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.fc2 = nn.Linear(in_dim, num_modalities)

    def forward(self, modality_tokens: list[Tensor]) -> Tensor:
        """modality_tokens: per level B x K x C_l -> logits B x M."""
        t = self.norm(torch.cat(modality_tokens, dim=2)).mean(dim=1)
        return self.fc2(F.gelu(self.fc1(t)))
