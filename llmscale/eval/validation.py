"""Held-out loss and perplexity, averaged over every data-parallel rank (for fine-tuning, over
every supervised token of the held-out batches, as training averages); for a masked-LM run also
the share of masked tokens predicted right."""

import math
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine

from llmscale.models.fused_loss import IGNORE_INDEX
from llmscale.parallel.distributed import all_reduce_mean
from llmscale.parallel.token_mean import global_token_denominator, with_denominator

Batch = Tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(engine, batches: List[Batch], device, masked_accuracy: bool = False,
             global_token_mean: bool = False) -> Dict[str, float]:
    """`masked_accuracy` needs whole logits on every rank: no pipeline, no tensor parallelism.
    `global_token_mean`: the loss is the mean over every target of the held-out batches."""
    denominator = (global_token_denominator(batches, device, engine.dp_world_size)
                   if global_token_mean else None)
    if isinstance(engine, PipelineEngine):
        if denominator is not None:
            batches = with_denominator(batches, denominator)
        # Averaged over the micro-batches and the data-parallel ranks, sent to every stage.
        loss = engine.eval_batch(iter(batches), num_micro_batches=len(batches)).item()
        return _metrics(loss)
    engine.eval()
    extra = () if denominator is None else (denominator,)
    losses = [engine(inputs.to(device), labels.to(device), *extra).float()
              for inputs, labels in batches]
    metrics = _metrics(all_reduce_mean(torch.stack(losses).mean()).item())
    if masked_accuracy:
        metrics["val_masked_accuracy"] = _masked_accuracy(engine, batches, device)
    engine.train()
    return metrics


def _masked_accuracy(engine, batches: List[Batch], device) -> float:
    """Predicted right over predicted, both summed over every data-parallel rank."""
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, labels in batches:
        labels = labels.to(device)
        predicted = engine(inputs.to(device)).argmax(-1)
        scored = labels != IGNORE_INDEX
        counts += torch.stack([(predicted == labels)[scored].sum(), scored.sum()]).double()
    dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def _metrics(loss: float) -> Dict[str, float]:
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
