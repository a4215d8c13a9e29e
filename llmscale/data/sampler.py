"""Which samples each data-parallel rank trains on, as a pure function of the global sample count.

Training position is one number, the global samples consumed so far. Every rank derives its
micro-batches from it, so a resumed run (even with a different data-parallel size) continues the
exact order of an uninterrupted one, with no sampler state to checkpoint.
"""

from typing import Protocol

import torch
from torch import Tensor


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    # (input_ids, labels), and for preference pairs their index too.
    def __getitem__(self, index: int) -> tuple[Tensor, ...]: ...


class GlobalSampleOrder:
    """Maps global sample index g (counting across epochs) to a dataset index.

    Epoch e = g // num_samples visits every sample once, in a permutation seeded by `seed + e`;
    with shuffle=False the order is the identity (used for validation).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"GlobalSampleOrder needs num_samples >= 1, got {num_samples}.")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        # Consecutive lookups stay in one epoch, so its permutation is kept rather than redrawn
        # (as a tensor: 8 bytes a sample, where a list of ints takes over 30).
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.int64)

    def dataset_index(self, global_index: int) -> int:
        if global_index < 0:
            raise ValueError(f"global sample index must be >= 0, got {global_index}.")
        epoch, position = divmod(global_index, self.num_samples)
        if not self.shuffle:
            return position
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutation = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        return int(self._permutation[position])


def rank_micro_batches(
    dataset: SampleDataset,
    order: GlobalSampleOrder,
    consumed_samples: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    dp_rank: int,
    dp_size: int,
) -> list[tuple[Tensor, ...]]:
    """The `grad_accum_steps` micro-batches `(input_ids[B, T], labels[B, T])` of rank `dp_rank`
    (each part of a sample stacked: a preference pair's are [B, 2, T] and its index [B])
    for the optimizer step whose global batch starts at sample `consumed_samples`.

    Accumulation step a of rank r holds global samples
    `consumed_samples + a * micro_batch_size * dp_size + r * micro_batch_size + j`, j < B,
    so the global batch is the same set of samples whatever dp_size and grad_accum_steps are.
    """
    if len(dataset) != order.num_samples:
        raise ValueError(
            f"sample order covers {order.num_samples} samples but the dataset has {len(dataset)}; "
            f"build the GlobalSampleOrder from this dataset."
        )
    if min(micro_batch_size, grad_accum_steps, dp_size) < 1:
        raise ValueError(
            f"micro_batch_size, grad_accum_steps and dp_size must be >= 1, got "
            f"{micro_batch_size}, {grad_accum_steps} and {dp_size}."
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}.")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}.")

    micro_batches: list[tuple[Tensor, ...]] = []
    for positions in micro_batch_positions(consumed_samples, micro_batch_size, grad_accum_steps,
                                           dp_rank, dp_size):
        samples = [dataset[order.dataset_index(position)] for position in positions]
        # Whatever a sample holds (preference pairs add their index), stacked part by part.
        micro_batches.append(tuple(torch.stack(part) for part in zip(*samples)))
    return micro_batches


def micro_batch_positions(consumed_samples: int, micro_batch_size: int, grad_accum_steps: int,
                          dp_rank: int, dp_size: int) -> list[range]:
    """The positions in the global sample order of each of rank `dp_rank`'s micro-batches (see
    `rank_micro_batches`): a sample's position, unlike its dataset index, differs between
    epochs and is the same for every layout."""
    first = consumed_samples + dp_rank * micro_batch_size
    return [range(first + step * micro_batch_size * dp_size,
                  first + step * micro_batch_size * dp_size + micro_batch_size)
            for step in range(grad_accum_steps)]
