"""Universal training: partial-label losses, sampling, optimisers, EMA, the loop, evaluation."""

from hermes.training.losses import modality_loss, partial_label_loss
from hermes.training.optim import Lamb, make_optimizer, warmup_cosine
from hermes.training.trainer import TrainConfig, Trainer, train

__all__ = [
    "Lamb",
    "TrainConfig",
    "Trainer",
    "make_optimizer",
    "modality_loss",
    "partial_label_loss",
    "train",
    "warmup_cosine",
]
