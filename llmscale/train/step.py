"""One optimizer step: the rank's micro-batches through the DeepSpeed engine."""

from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import torch

from llmscale.parallel.distributed import all_reduce_mean
from llmscale.train.anomaly import Anomaly, update_withheld

Batch = Tuple[torch.Tensor, torch.Tensor]


def train_step(engine, batches: List[Batch], device: torch.device,
               judge: Callable[[float], Optional[Anomaly]]) -> Tuple[float, Optional[Anomaly]]:
    """Forward and backward every micro-batch, then update, unless `judge` finds the step's
    loss (the mean over all ranks) anomalous: then the update is withheld."""
    losses = []
    for micro_batch, (inputs, labels) in enumerate(batches, start=1):
        loss = engine(inputs.to(device), labels.to(device))
        engine.backward(loss)
        losses.append(loss.detach().float())
        if micro_batch < len(batches):
            engine.step()  # accumulates; the last micro-batch's step updates the weights
    # Judged before the update; every rank judges the same all-reduced loss, so all agree.
    loss = all_reduce_mean(torch.stack(losses).mean()).item()
    anomaly = judge(loss)
    with update_withheld(engine) if anomaly else nullcontext():
        engine.step()
    return loss, anomaly
