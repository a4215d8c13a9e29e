"""Linear warmup, then cosine, linear or no decay down to `min_lr` at `max_steps`."""

import math

import torch

from llmscale.config.schema import LRDecay, OptimConfig


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == LRDecay.constant:
        return optim.lr
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.decay == LRDecay.cosine:
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        fraction = 1.0 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * fraction


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, optim, max_steps) / optim.lr
    )
