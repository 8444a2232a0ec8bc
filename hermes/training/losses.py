"""Partial-label segmentation loss and the modality loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def partial_label_loss(
    logits: Tensor, targets: Tensor, annotated: Tensor, smooth: float = 1e-5,
    ignore: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BCE-with-logits + soft Dice over the tasks each image's dataset annotates.

    Args:
        logits: B x T x D x H x W, one logit per requested task.
        targets: B x T x D x H x W in {0, 1} (any float/bool dtype).
        annotated: B x T bool; False for null padding and tasks the image is not labelled for.
        ignore: optional B x 1 x D x H x W bool, True at unannotated voxels (nnU-Net "ignore"
            label): they count in neither loss (BCE is the mean over the other voxels).
    Returns:
        (bce, dice): means over annotated (image, task) pairs; zero when none is annotated.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if annotated.shape != logits.shape[:2]:
        raise ValueError(f"annotated must be B x T = {tuple(logits.shape[:2])}")
    w = annotated.to(logits.dtype).float()
    n = w.sum()
    if n == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(2)
    probs = torch.sigmoid(logits).flatten(2)
    tgt = targets.flatten(2)
    if ignore is None:
        bce = bce.mean(dim=2)  # B x T
    else:
        if ignore.shape != (logits.shape[0], 1, *logits.shape[2:]):
            want = (logits.shape[0], 1, *logits.shape[2:])
            raise ValueError(f"ignore must be B x 1 x spatial = {want}, got "
                             f"{tuple(ignore.shape)}")
        keep = (~ignore.bool()).flatten(2).to(bce.dtype)  # B x 1 x V
        bce = (bce * keep).sum(dim=2) / keep.sum(dim=2).clamp_min(1.0)
        probs, tgt = probs * keep, tgt * keep
    inter = (probs * tgt).sum(dim=2)
    denom = probs.sum(dim=2) + tgt.sum(dim=2)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return (bce * w).sum() / n, (dice * w).sum() / n


def modality_loss(logits: Tensor, modality_idx: Tensor) -> Tensor:
    """Cross-entropy of the modality head; samples with index -1 (unknown) are ignored."""
    if (modality_idx < 0).all():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), modality_idx, ignore_index=-1)
