"""Held-out loss and perplexity, averaged over every data-parallel rank."""

import math
from typing import Dict, List, Tuple

import torch

from llmscale.parallel.distributed import all_reduce_mean


@torch.no_grad()
def evaluate(engine, batches: List[Tuple[torch.Tensor, torch.Tensor]], device) -> Dict[str, float]:
    engine.eval()
    losses = [engine(inputs.to(device), labels.to(device)).float() for inputs, labels in batches]
    engine.train()
    loss = all_reduce_mean(torch.stack(losses).mean()).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
