"""Exponential moving average of model weights, used for evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after each optimiser step.

    Floating-point parameters and buffers are averaged; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("EMA decay must lie in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        for name, value in self.model.state_dict().items():
            new = src[name].detach()
            if value.is_floating_point():
                value.mul_(self.decay).add_(new.to(value.dtype), alpha=1 - self.decay)
            else:
                value.copy_(new)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
