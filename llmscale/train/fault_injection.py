"""Fault injection for tests of failure handling, switched on by `train.inject_nan_at_batch` and
`train.inject_spike_at_batch` (Megatron has debug flags of the same kind). A real run sets
neither and registers nothing."""

from typing import Callable, Dict, Optional

import torch

from llmscale.config.schema import TrainConfig
from llmscale.models.llama import Llama

# Far above any spike_factor a run would use, yet finite: the gradients stay finite too, so only
# llmscale's own check, not DeepSpeed's overflow check, can keep such a step from updating.
SPIKE = 100.0


def inject_loss_faults(model: Llama, cfg: TrainConfig, global_batch_size: int,
                       consumed_samples: Callable[[], int]) -> None:
    """Scales the model's training loss (`model.loss`, which the pipeline stages call too), and so the gradients of its backward, by NaN or by
    `SPIKE` while the run trains on the chosen global batch of the sample order (1-based). The
    batch, not the step number, is faulty: once a rollback passes over it, it never comes back."""
    factors: Dict[int, float] = {}
    if cfg.inject_nan_at_batch:
        factors[(cfg.inject_nan_at_batch - 1) * global_batch_size] = float("nan")
    if cfg.inject_spike_at_batch:
        factors[(cfg.inject_spike_at_batch - 1) * global_batch_size] = SPIKE
    if not factors:
        return

    loss = model.loss

    def scaled_loss(hidden: torch.Tensor, labels: torch.Tensor,
                    denominator: Optional[torch.Tensor] = None,
                    per_token: bool = False) -> torch.Tensor:
        # Training steps only: evaluation runs without gradients.
        factor = factors.get(consumed_samples()) if torch.is_grad_enabled() else None
        value = loss(hidden, labels, denominator, per_token)
        return value if factor is None else value * factor

    model.loss = scaled_loss
