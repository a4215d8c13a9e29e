"""Evaluation split over data-parallel ranks: each rank takes every world-size-th unit of work
(an example, a batch of windows), and the results are gathered back into their global order, so
any number of ranks computes and adds up exactly what one process does."""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, TypeVar

import torch
import torch.distributed as dist

from llmscale.parallel.distributed import end_distributed

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> Dict[int, T]:
        """This rank's items by their global index."""
        return {index: items[index] for index in range(self.rank, len(items), self.world_size)}

    def gather(self, results: Dict[int, Any]) -> List[Any]:
        """Every rank's results, in global index order, on every rank."""
        if self.world_size == 1:
            return [results[index] for index in sorted(results)]
        everyone: List[Dict[int, Any]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(everyone, results)
        merged = {index: value for part in everyone for index, value in part.items()}
        return [merged[index] for index in sorted(merged)]


@contextmanager
def evaluation_ranks(device: str = "auto") -> Iterator[Ranks]:
    """One process under `python`; under `torchrun` the process group its environment names
    (gloo on CPU, NCCL on GPUs), ended on the way out if it was started here."""
    started_here = not dist.is_initialized()
    try:
        yield _start_ranks(device)
    finally:
        if started_here:
            end_distributed()


def _start_ranks(device: str) -> Ranks:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return Ranks(0, 1, chosen)
    return Ranks(dist.get_rank(), dist.get_world_size(), chosen)
