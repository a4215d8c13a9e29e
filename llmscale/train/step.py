"""One optimizer step: the rank's micro-batches through the DeepSpeed engine."""

from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.schedule import OptimizerStep

from llmscale.parallel.distributed import all_reduce_mean
from llmscale.train.anomaly import Anomaly, update_withheld

Batch = Tuple[torch.Tensor, torch.Tensor]
# The loss guard's check of a step's loss: None for a sound loss, else the anomaly.
LossCheck = Callable[[float], Optional[Anomaly]]


def train_step(engine, batches: List[Batch], device: torch.device,
               check_loss: LossCheck) -> Tuple[float, Optional[Anomaly]]:
    """Forward and backward every micro-batch, then update, unless `check_loss` finds the step's
    loss (the mean over all data-parallel ranks) anomalous: then the update is withheld."""
    if isinstance(engine, PipelineEngine):
        return _pipeline_train_step(engine, batches, check_loss)
    losses = []
    for micro_batch, (inputs, labels) in enumerate(batches, start=1):
        loss = engine(inputs.to(device), labels.to(device))
        engine.backward(loss)
        losses.append(loss.detach().float())
        if micro_batch < len(batches):
            engine.step()  # accumulates; the last micro-batch's step updates the weights
    # Checked before the update; every rank checks the same all-reduced loss, so all agree.
    # (Tensor-parallel ranks of one replica hold the same loss, so the mean is unchanged.)
    loss = all_reduce_mean(torch.stack(losses).mean()).item()
    anomaly = check_loss(loss)
    with update_withheld(engine) if anomaly else nullcontext():
        engine.step()
    return loss, anomaly


def _pipeline_train_step(engine: PipelineEngine, batches: List[Batch],
                         check_loss: LossCheck) -> Tuple[float, Optional[Anomaly]]:
    """DeepSpeed's 1F1B schedule ends in an optimizer-step instruction; the loss is checked
    there, once every micro-batch has run, so that the update can still be withheld."""
    checked: List[Tuple[float, Optional[Anomaly]]] = []
    optimizer_step = PipelineEngine._INSTRUCTION_MAP[OptimizerStep]

    def checked_optimizer_step(engine: PipelineEngine, **kwargs) -> None:
        loss = _pipeline_step_loss(engine)
        anomaly = check_loss(loss)
        checked.append((loss, anomaly))
        with update_withheld(engine) if anomaly else nullcontext():
            optimizer_step(engine, **kwargs)

    engine._INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP,
                               OptimizerStep: checked_optimizer_step}
    try:
        engine.train_batch(iter(batches))
    finally:
        del engine._INSTRUCTION_MAP
    return checked[0]


def _pipeline_step_loss(engine: PipelineEngine) -> float:
    """The step's mean loss over the data-parallel replicas, on every rank: only the last
    stage's ranks (tp of them per replica, all holding the same loss) have computed it."""
    loss = torch.zeros((), device=engine.device)
    if engine.is_last_stage():
        loss += engine.total_loss.float() / engine.gradient_accumulation_steps()
    dist.all_reduce(loss)
    return loss.item() / (engine.dp_world_size * engine.grid.get_tensor_model_parallel_world_size())
