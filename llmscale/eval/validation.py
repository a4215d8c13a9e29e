"""Held-out loss and perplexity, averaged over every data-parallel rank."""

import math
from typing import Dict, List, Tuple

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine

from llmscale.parallel.distributed import all_reduce_mean


@torch.no_grad()
def evaluate(engine, batches: List[Tuple[torch.Tensor, torch.Tensor]], device) -> Dict[str, float]:
    if isinstance(engine, PipelineEngine):
        # Averaged over the micro-batches and the data-parallel ranks, sent to every stage.
        loss = engine.eval_batch(iter(batches), num_micro_batches=len(batches)).item()
        return _metrics(loss)
    engine.eval()
    losses = [engine(inputs.to(device), labels.to(device)).float() for inputs, labels in batches]
    engine.train()
    return _metrics(all_reduce_mean(torch.stack(losses).mean()).item())


def _metrics(loss: float) -> Dict[str, float]:
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
