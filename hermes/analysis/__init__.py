"""Analyses of trained models: what the learned context priors encode."""

from hermes.analysis.priors import (
    SimilarityResult,
    analyse_priors,
    cluster_order,
    cosine_similarity,
    modality_prior_similarity,
    nearest_neighbours,
    task_prior_similarity,
)

__all__ = [
    "SimilarityResult",
    "analyse_priors",
    "cluster_order",
    "cosine_similarity",
    "modality_prior_similarity",
    "nearest_neighbours",
    "task_prior_similarity",
]
