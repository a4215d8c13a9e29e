"""What the loop logs after each training step: a list of collectors, each turning the finished
step into some of its metrics, so that a new metric is one collector here (a light form of
OLMo-core's callbacks)."""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from llmscale.models.moe import MoEFeedForward
from llmscale.tracking.sinks import Metrics
from llmscale.train.anomaly import Anomaly
from llmscale.train.peak_memory import peak_memory_metrics
from llmscale.train.throughput import ThroughputMeter


@dataclass(frozen=True)
class FinishedStep:
    loss: float
    lr: float  # the rate the step's update used
    seconds: float
    tokens: int  # of the step, over all ranks
    consumed_tokens: int  # of the run so far
    anomaly: Optional[Anomaly]
    # What the objective reports beside the loss (DPO: TRL's reward and log-prob means).
    objective_metrics: Metrics = field(default_factory=dict)


Collector = Callable[[FinishedStep], Metrics]


def step_collectors(engine, model: nn.Module, meter: ThroughputMeter,
                    device: torch.device) -> List[Collector]:
    """The trainer's collectors, in the order their metrics appear in a record. Every rank
    must run them (peak memory is all-reduced)."""
    return [
        lambda step: {"loss": step.loss, "lr": step.lr,
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                      "consumed_tokens": step.consumed_tokens},
        lambda step: meter.measure(step.tokens, step.seconds),
        lambda step: peak_memory_metrics(device),
        lambda step: router_metrics(model),
        lambda step: step.objective_metrics,
        lambda step: step.anomaly.record() if step.anomaly else {},
    ]


def collect(collectors: List[Collector], step: FinishedStep) -> Metrics:
    metrics: Metrics = {}
    for collector in collectors:
        metrics.update(collector(step))
    return metrics


def router_metrics(model: nn.Module) -> Dict[str, float]:
    """Router health over the MoE layers' last forward (this rank's tokens); empty for a dense
    model. `moe_expert_load_max` is the busiest expert's share relative to a perfectly even
    one (1.0), worst layer."""
    layers = [m for m in model.modules()
              if isinstance(m, MoEFeedForward) and m.aux_loss is not None]
    if not layers:
        return {}
    routes = sum(float(m.tokens_per_expert.sum()) for m in layers)
    dropped = sum(float(m.dropped_tokens) for m in layers)
    load = [float(m.tokens_per_expert.max() / m.tokens_per_expert.float().mean()) for m in layers]
    return {
        "moe_aux_loss": sum(float(m.aux_loss.detach()) for m in layers) / len(layers),
        "moe_dropped_fraction": dropped / routes,
        "moe_expert_load_max": max(load),
    }
