"""One optimizer step of preference optimisation (objective=dpo).

Each micro-batch's loss is its pairs' summed preference losses over a denominator that makes
DeepSpeed's averaging (over accumulated micro-batches and data-parallel ranks) leave the mean
over every pair of the global batch (`llmscale.parallel.token_mean`, which SFT's token mean
shares): neither gradient accumulation nor the data-parallel size changes the loss or its
gradient. The reward and log-prob metrics are means over the same pairs.
"""

from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn

from llmscale.config.schema import DPOConfig
from llmscale.eval.preference_validation import PairBatch, global_pair_means
from llmscale.objectives.preference_batch import micro_batch_preference
from llmscale.parallel.token_mean import all_reduce_data_parallel, loss_denominator
from llmscale.tracking.sinks import Metrics
from llmscale.train.anomaly import Anomaly
from llmscale.train.step import LossCheck, update_unless_anomalous


def preference_train_step(engine, batches: List[PairBatch], device: torch.device,
                          check_loss: LossCheck, cfg: DPOConfig,
                          adapter_model: Optional[nn.Module] = None
                          ) -> Tuple[float, Optional[Anomaly], Metrics]:
    """Forward and backward every micro-batch of pairs, then update unless `check_loss` finds
    the step's loss anomalous; also TRL's metrics of the step. `adapter_model`: the reference
    is its frozen base, a forward with the adapters off before each micro-batch's own."""
    pairs = torch.tensor(sum(len(inputs) for inputs, _, _ in batches), device=device)
    denominator = loss_denominator(all_reduce_data_parallel(pairs), engine.dp_world_size,
                                   len(batches))
    forward = partial(engine, per_token=True)
    losses, results = [], []
    for micro_batch, (inputs, labels, reference) in enumerate(batches, start=1):
        result = micro_batch_preference(forward, cfg, inputs.to(device), labels.to(device),
                                        None if reference is None else reference.to(device),
                                        adapter_model)
        loss = result.losses.sum() / denominator
        engine.backward(loss)
        losses.append(loss.detach().float())
        results.append(result)
        if micro_batch < len(batches):
            engine.step()  # accumulates; the last micro-batch's step updates the weights
    metrics = global_pair_means(results, device)
    del metrics["loss"]  # the step's loss is logged as `loss`, the same mean
    loss, anomaly = update_unless_anomalous(engine, losses, check_loss)
    return loss, anomaly, metrics
