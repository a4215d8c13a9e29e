"""One optimizer step of preference optimisation (objective=dpo).

Each micro-batch's loss is its pairs' summed preference losses over a denominator that makes
DeepSpeed's averaging (over accumulated micro-batches and data-parallel ranks) leave the mean
over every pair of the global batch (`llmscale.parallel.token_mean`, which SFT's token mean
shares): neither gradient accumulation nor the data-parallel size changes the loss or its
gradient. Under pipeline parallelism the last stage computes that loss from its per-token losses
(`token_loss_objective`), the two rows of a pair in one micro-batch, and sends the pairs'
log-probs to the other stages (`from_last_stage`). The reward and log-prob metrics are means
over the same pairs, on every rank.
"""

from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch import nn

from llmscale.config.schema import DPOConfig
from llmscale.eval.preference_validation import global_pair_means
from llmscale.objectives.preference_batch import (
    PairBatch, PairLogps, pair_logps, pair_preference, sequence_pair_logps,
)
from llmscale.parallel.pair_forward import from_last_stage, pipeline_batches, with_base_reference
from llmscale.parallel.pipeline import token_loss_objective
from llmscale.parallel.token_mean import all_reduce_data_parallel, loss_denominator
from llmscale.tracking.sinks import Metrics
from llmscale.train.anomaly import Anomaly
from llmscale.train.step import LossCheck, pipeline_train_step, update_unless_anomalous

# A micro-batch's loss from its pairs' log-probs and reference log-probs.
PairLoss = Callable[[PairLogps, Optional[torch.Tensor]], torch.Tensor]
# The step's loss, its anomaly if any, and each micro-batch's log-probs on every rank.
StepResult = Tuple[float, Optional[Anomaly], List[PairLogps]]


def preference_train_step(engine, batches: List[PairBatch], device: torch.device,
                          check_loss: LossCheck, cfg: DPOConfig,
                          adapter_model: Optional[nn.Module] = None
                          ) -> Tuple[float, Optional[Anomaly], Metrics]:
    """Forward and backward every micro-batch of pairs, then update unless `check_loss` finds
    the step's loss anomalous; also TRL's metrics of the step. `adapter_model`: the reference
    is its frozen base, a forward with the adapters off before the step's own."""
    if adapter_model is not None:
        batches = with_base_reference(engine, adapter_model, batches, device)
    pairs = torch.tensor(sum(len(inputs) for inputs, _, _ in batches), device=device)
    denominator = loss_denominator(all_reduce_data_parallel(pairs), engine.dp_world_size,
                                   len(batches))

    def pair_loss(logps: PairLogps, reference: Optional[torch.Tensor]) -> torch.Tensor:
        return pair_preference(cfg, logps, reference).losses.sum() / denominator

    run = _pipeline_step if isinstance(engine, PipelineEngine) else _micro_batch_step
    loss, anomaly, logps = run(engine, batches, device, check_loss, pair_loss)
    metrics = global_pair_means(cfg, logps, batches, device)
    del metrics["loss"]  # the step's loss is logged as `loss`, the same mean
    return loss, anomaly, metrics


def _micro_batch_step(engine, batches: List[PairBatch], device: torch.device,
                      check_loss: LossCheck, pair_loss: PairLoss) -> StepResult:
    forward = partial(engine, per_token=True)
    losses, logps = [], []
    for micro_batch, (inputs, labels, reference) in enumerate(batches, start=1):
        pair = pair_logps(forward, inputs.to(device), labels.to(device))
        loss = pair_loss(pair, None if reference is None else reference.to(device))
        engine.backward(loss)
        losses.append(loss.detach().float())
        logps.append((pair[0].detach(), pair[1]))
        if micro_batch < len(batches):
            engine.step()  # accumulates; the last micro-batch's step updates the weights
    loss, anomaly = update_unless_anomalous(engine, losses, check_loss)
    return loss, anomaly, logps


def _pipeline_step(engine: PipelineEngine, batches: List[PairBatch], device: torch.device,
                   check_loss: LossCheck, pair_loss: PairLoss) -> StepResult:
    logps: List[PairLogps] = []  # on the last stage

    def last_stage_loss(token_losses: torch.Tensor, labels: torch.Tensor,
                        *reference: torch.Tensor) -> torch.Tensor:
        pair = sequence_pair_logps(token_losses, labels)
        logps.append((pair[0].detach(), pair[1]))
        return pair_loss(pair, reference[0] if reference else None)

    with token_loss_objective(engine.module, last_stage_loss):
        loss, anomaly = pipeline_train_step(engine, pipeline_batches(batches), check_loss)
    return loss, anomaly, from_last_stage(engine, logps, batches, device)
