"""Micro-batches of preference pairs through the engine, plain or pipelined, without gradients:
each micro-batch's response log-probs and lengths (`PairLogps`), on every rank. The reference
pass, DPO's validation and an adapter run's frozen base all run this way.

Under pipeline parallelism only the last stage sees per-token losses: its `loss_fn` turns them
into the pairs' log-probs (`token_loss_objective`), and one broadcast over the pipeline group
sends them to the other stages, so that every rank holds the same figures as without stages.
"""

from functools import partial
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from megatron.core import parallel_state
from torch import nn

from llmscale.adapters.lora import adapters_off
from llmscale.objectives.preference_batch import (
    PairBatch, PairLogps, pair_logps, sequence_pair_logps,
)
from llmscale.parallel.pipeline import token_loss_objective

# A pair micro-batch as the pipeline takes it: input ids [2B, S] for the first stage; for the
# last, the labels [2B, S] and, when there is one, the [B, 2] reference.
PipelineBatch = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]


@torch.no_grad()
def forward_pairs(engine, batches: Sequence[PairBatch], device: torch.device) -> List[PairLogps]:
    """The log-probs and lengths of each micro-batch's pairs, in evaluation mode."""
    if isinstance(engine, PipelineEngine):
        logps = []

        def record(token_losses: torch.Tensor, labels: torch.Tensor, *_) -> torch.Tensor:
            logps.append(sequence_pair_logps(token_losses, labels))
            return token_losses.new_zeros(())  # eval_batch averages a loss: it has no use here

        with token_loss_objective(engine.module, record):
            engine.eval_batch(iter(pipeline_batches(batches)), num_micro_batches=len(batches),
                              bcast_loss=False)
        return from_last_stage(engine, logps, batches, device)
    engine.eval()
    forward = partial(engine, per_token=True)
    logps = [pair_logps(forward, inputs.to(device), labels.to(device))
             for inputs, labels, _ in batches]
    engine.train()
    return logps


def with_base_reference(engine, adapter_model: nn.Module, batches: Sequence[PairBatch],
                        device: torch.device) -> List[PairBatch]:
    """`batches` with an adapter model's reference, its frozen base's log-probs: the same
    forward with every adapter off (no second model resident), before any weight changes."""
    with adapters_off(adapter_model):
        reference = forward_pairs(engine, batches, device)
    return [(inputs, labels, logps) for (inputs, labels, _), (logps, _) in zip(batches, reference)]


def pipeline_batches(batches: Sequence[PairBatch]) -> List[PipelineBatch]:
    """The pairs' rows as sequences (the two of a pair stay in one micro-batch), the labels and
    the reference together, since the last stage alone needs them."""
    return [(inputs.flatten(0, 1), (labels.flatten(0, 1), *(() if reference is None
                                                            else (reference,))))
            for inputs, labels, reference in batches]


def from_last_stage(engine: PipelineEngine, logps: List[PairLogps],
                    batches: Sequence[PairBatch], device: torch.device) -> List[PairLogps]:
    """The last stage's `logps` of every micro-batch (other stages pass an empty list), on every
    stage of the pipeline (fp32 log-probs and integer lengths travel exactly as fp64)."""
    sizes = [len(inputs) for inputs, _, _ in batches]
    if engine.is_last_stage():
        table = torch.cat([torch.stack([values.double(), lengths.double()], dim=-1)
                           for values, lengths in logps]).to(device)
    else:
        table = torch.zeros(sum(sizes), 2, 2, dtype=torch.float64, device=device)
    dist.broadcast(table, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return [(part[..., 0].float(), part[..., 1].long()) for part in table.split(sizes)]
