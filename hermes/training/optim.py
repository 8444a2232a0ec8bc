"""Optimisers (AdamW, LAMB without apex) and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class Lamb(Optimizer):
    """LAMB (You et al., 2020): Adam moments with a per-tensor trust ratio ||w|| / ||update||.

    ``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w``; the step is
    ``lr * clamp(||w|| / ||update||, max=max_trust) * update`` (ratio 1 when either norm is 0).
    """

    def __init__(
        self, params: Iterable, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 0.0, max_trust: float = 10.0,
    ) -> None:
        if lr <= 0 or eps <= 0:
            raise ValueError("lr and eps must be positive")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_trust=max_trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = m / (1 - b1 ** state["step"])
                v_hat = v / (1 - b2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where(
                    (w_norm > 0) & (u_norm > 0),
                    (w_norm / u_norm).clamp(max=group["max_trust"]),
                    torch.ones_like(w_norm),
                )
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def make_optimizer(name: str, params: Iterable, lr: float, weight_decay: float) -> Optimizer:
    """``adamw`` (default) or ``lamb``."""
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lamb":
        return Lamb(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or lamb")


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.01) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``final_fraction`` x lr."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)
