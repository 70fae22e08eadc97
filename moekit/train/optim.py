"""Optimizer set-up and the learning-rate schedule, as pure functions."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "constant", "inv_sqrt")


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
          schedule: str = "cosine") -> float:
    """Linear warmup to ``base_lr``, then the decay named by ``schedule``:

    - ``cosine``: to ``min_lr_ratio * base_lr`` at ``total_steps``; past it the rate stays at the minimum
      (nanoGPT's ``get_lr``).
    - ``constant``: ``base_lr`` to the end.
    - ``inv_sqrt``: ``base_lr * sqrt(warmup / step)`` (T5 and the Switch Transformer), at least
      ``min_lr_ratio * base_lr``. Neither of the last two depends on ``total_steps``, so a curve's
      point at step s is the same whatever the run's length: "when did it reach loss x" is well defined.

    ``step`` counts optimizer steps from 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "inv_sqrt":
        return max(min_lr, base_lr * math.sqrt(max(warmup_steps, 1) / (step + 1)))
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (linear, expert and router weights); never decay norms, biases
    or embeddings (decaying an embedding shrinks rare tokens' vectors; GPT-3 and nanoGPT exclude them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "norm" in name or name.endswith(".bias") or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CPU and GPU): 5 ms instead of 28 ms per step for 10M float32
    parameters on this 2-core CPU against ``foreach=True`` (torch 2.13). transformers' Trainer also
    defaults to it (``adamw_torch_fused``)."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
