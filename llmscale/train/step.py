"""One optimizer step: the rank's micro-batches through the DeepSpeed engine.

Pretraining averages each micro-batch's token losses over its own targets. Supervised
fine-tuning (`global_token_mean`) weighs every target of the global batch alike instead
(`llmscale.parallel.token_mean`), counted before the forward passes; the step's loss (the mean
of the micro-batch losses over steps and ranks) is then that global mean too.
"""

from contextlib import nullcontext
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.schedule import OptimizerStep

from llmscale.parallel.distributed import all_reduce_mean
from llmscale.parallel.token_mean import global_token_denominator, with_denominator
from llmscale.train.anomaly import Anomaly, update_withheld

Batch = Tuple[torch.Tensor, torch.Tensor]
# The loss guard's check of a step's loss: None for a sound loss, else the anomaly.
LossCheck = Callable[[float], Optional[Anomaly]]


def train_step(engine, batches: List[Batch], device: torch.device, check_loss: LossCheck,
               global_token_mean: bool = False) -> Tuple[float, Optional[Anomaly]]:
    """Forward and backward every micro-batch, then update, unless `check_loss` finds the step's
    loss (the mean over all data-parallel ranks) anomalous: then the update is withheld.
    `global_token_mean`: the loss is the mean over every target of the global batch (above)."""
    denominator = None
    if global_token_mean:
        denominator = global_token_denominator(batches, device, engine.dp_world_size)
    if isinstance(engine, PipelineEngine):
        if denominator is not None:
            batches = with_denominator(batches, denominator)
        return pipeline_train_step(engine, batches, check_loss)
    extra = () if denominator is None else (denominator,)
    losses = []
    for micro_batch, (inputs, labels) in enumerate(batches, start=1):
        loss = engine(inputs.to(device), labels.to(device), *extra)
        engine.backward(loss)
        losses.append(loss.detach().float())
        if micro_batch < len(batches):
            engine.step()  # accumulates; the last micro-batch's step updates the weights
    return update_unless_anomalous(engine, losses, check_loss)


def update_unless_anomalous(engine, losses: List[torch.Tensor], check_loss: LossCheck
                            ) -> Tuple[float, Optional[Anomaly]]:
    """The last micro-batch's `engine.step()`, which updates, unless the step's loss (the mean of
    the micro-batch `losses` over the data-parallel ranks) is anomalous."""
    # Checked before the update; every rank checks the same all-reduced loss, so all agree.
    # (Tensor-parallel ranks of one replica hold the same loss, so the mean is unchanged.)
    loss = all_reduce_mean(torch.stack(losses).mean()).item()
    anomaly = check_loss(loss)
    with update_withheld(engine) if anomaly else nullcontext():
        engine.step()
    return loss, anomaly


def pipeline_train_step(engine: PipelineEngine, batches: List[Batch],
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
