"""A loss that weighs every target of a global batch alike, whatever the split.

Each micro-batch's loss is its summed token losses divided by `count / (dp * micro_batches)`,
where `count` is the number of targets in all micro-batches of all data-parallel ranks. DeepSpeed
divides each micro-batch's loss by its accumulation steps and averages over the `dp` ranks (in
training the gradients, in a pipeline's evaluation the losses), so the result is exactly
(sum over the global batch) / count: neither the split into micro-batches nor the data-parallel
size changes it, however unevenly the trained-on tokens fall (supervised fine-tuning's masks).
"""

from typing import List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from llmscale.models.fused_loss import IGNORE_INDEX

Batch = Tuple[torch.Tensor, torch.Tensor]


def global_token_denominator(batches: List[Batch], device: torch.device, dp: int
                             ) -> torch.Tensor:
    """The denominator of a rank's `batches`, one of `dp` ranks' equal shares (one all-reduce)."""
    global_count = all_reduce_data_parallel(target_count(batches).to(device))
    return loss_denominator(global_count, dp, len(batches))


def target_count(batches: List[Batch]) -> torch.Tensor:
    """The targets (labels not ignored) of a rank's micro-batches, as an int64 scalar."""
    return sum(((labels != IGNORE_INDEX).sum() for _, labels in batches),
               torch.zeros((), dtype=torch.int64))


def all_reduce_data_parallel(count: torch.Tensor) -> torch.Tensor:
    """The sum of `count` over the data-parallel ranks (the tensor- and pipeline-parallel ranks
    of one replica hold the same batches, and are not counted again)."""
    count = count.clone()
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return count


def loss_denominator(global_count: torch.Tensor, dp: int, micro_batches: int) -> torch.Tensor:
    """What each micro-batch divides its summed token losses by (fp32), so that DeepSpeed's
    division by `micro_batches` and average over `dp` ranks leave sum / `global_count`."""
    return (global_count.clamp(min=1).double() / (dp * micro_batches)).float()


def with_denominator(batches: List[Batch], denominator: torch.Tensor) -> List[Batch]:
    """The form DeepSpeed's pipeline takes them in: the last stage's loss gets the labels and
    the denominator together."""
    return [(inputs, (labels, denominator)) for inputs, labels in batches]
