"""Memory per device of a parallel plan, from the config alone, and the plans that fit a device.

Model states follow ZeRO (Rajbhandari et al., 2020): AdamW keeps, per parameter, the weight,
its gradient and the optimizer state (bf16 training: 2 + 2 bytes and an fp32 master copy plus
two fp32 moments, 12 bytes; fp32 training: 4 + 4 and the two moments, 8 bytes). ZeRO-1 shards
the optimizer state over the data-parallel group, ZeRO-2 the gradients too, ZeRO-3 also the
weights. Tensor parallelism splits every attention/MLP matrix and the vocabulary (norms are
replicated); pipeline parallelism gives each stage num_layers / pp layers, the first stage the
embedding and the last the final norm and lm_head (a tied lm_head is a second copy there, as in
Megatron, since the two ends sit on different devices).

Activations follow Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
Transformer Models", in 16-bit (doubled for fp32 training). Per layer and micro-batch of b
sequences of length s, hidden size h, a heads:
  no recompute   s*b*h*(34 + 5*a*s/h)
  selective      s*b*h*34      (attention scores/softmax recomputed, the 5*a*s/h term)
  full           2*s*b*h       (only each layer's input kept)
each divided by tp, assuming tensor parallelism runs with sequence parallelism. The output
layer and loss add 4*s*b*h*(1 + v/h) / tp on the last stage. Under 1F1B the stage i of pp holds
pp - i micro-batches in flight, so the first stage holds pp of them.

The paper's formula is for GPT-3-shaped layers (4h MLP, dropout, scores materialised); for Llama
(SwiGLU, no dropout, GQA) it is an approximation. Not covered, and left to the margin: the
CUDA context, NCCL buffers, ZeRO-3's gathered layers and prefetch, temporary buffers of the
backward pass and allocator fragmentation. The estimates have not been checked against
measured memory of real runs.
"""

from dataclasses import dataclass, replace
from enum import Enum
from typing import List

from llmscale.config.load import ConfigError
from llmscale.config.schema import LLMScaleConfig, ModelConfig, Precision
from llmscale.config.validate import ParallelPlan, validate
from llmscale.models.flops import layer_matmul_parameters

GiB = 1024**3
# Share of the device kept free for what the estimate leaves out (see the module docstring);
# 10% is the headroom commonly left for allocator fragmentation and workspaces.
MARGIN = 0.10
MAX_TP = 8  # one node's NVLink domain; beyond it tensor parallelism crosses the network


class Recompute(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the device that needs the most: the first or the last pipeline stage."""

    stage: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def fits(self, device_bytes: float) -> bool:
        return self.total <= (1 - MARGIN) * device_bytes


@dataclass(frozen=True)
class PlanOption:
    plan: ParallelPlan
    recompute: Recompute
    estimate: MemoryEstimate


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one tensor-parallel rank of pipeline stage `stage`."""
    d, vocab = model.hidden_size, model.vocab_size
    per_layer = layer_matmul_parameters(model) / tp + 2 * d  # two replicated RMSNorms
    count = model.num_layers // pp * per_layer
    first, last = stage == 0, stage == pp - 1
    if first:
        count += vocab * d / tp
    if last:
        count += d  # final norm
        if not (model.tie_embeddings and first):
            count += vocab * d / tp
    return count


def layer_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                           recompute: Recompute) -> float:
    """16-bit activations one layer keeps for backward, per micro-batch (Korthikanti et al.)."""
    sbh = seq_len * micro_batch * model.hidden_size
    if recompute == Recompute.full:
        return 2 * sbh / tp
    per_element = 34.0
    if recompute == Recompute.none:
        per_element += 5 * model.num_heads * seq_len / model.hidden_size
    return sbh * per_element / tp


def estimate(model: ModelConfig, plan: ParallelPlan, seq_len: int, precision: Precision,
             recompute: Recompute) -> MemoryEstimate:
    """Memory of the first and the last pipeline stage; returns the larger."""
    weight, grad = (2, 2) if precision == Precision.bf16 else (4, 4)
    optimizer = 16 - weight - grad
    dp, zero = plan.dp, plan.zero_stage
    activation_scale = 2 if precision == Precision.fp32 else 1
    layer = layer_activation_bytes(model, seq_len, plan.micro_batch_size, plan.tp, recompute)
    sbh = seq_len * plan.micro_batch_size * model.hidden_size
    output_layer = 4 * sbh * (1 + model.vocab_size / model.hidden_size) / plan.tp
    estimates = []
    for stage in sorted({0, plan.pp - 1}):
        params = stage_parameters(model, plan.tp, plan.pp, stage)
        in_flight = plan.pp - stage
        activations = model.num_layers // plan.pp * layer * in_flight
        if stage == plan.pp - 1:
            activations += output_layer
        estimates.append(MemoryEstimate(
            stage=stage,
            parameters=params * weight / (dp if zero >= 3 else 1),
            gradients=params * grad / (dp if zero >= 2 else 1),
            optimizer=params * optimizer / (dp if zero >= 1 else 1),
            activations=activations * activation_scale,
        ))
    return max(estimates, key=lambda e: e.total)


def _cost(option: PlanOption) -> tuple:
    """Cheaper first: less model parallelism (communication, pipeline bubble), then less
    recomputation, then a lower ZeRO stage (less communication), then pipeline over tensor
    parallelism at equal product (tensor parallelism communicates every layer)."""
    recompute_rank = list(Recompute).index(option.recompute)
    plan = option.plan
    return (plan.tp * plan.pp, recompute_rank, plan.zero_stage, plan.tp)


def fitting_plans(cfg: LLMScaleConfig, world_size: int, device_bytes: float) -> List[PlanOption]:
    """Plans of `world_size` ranks that fit `device_bytes`, cheapest first. Every candidate goes
    through `validate`, so the rules a real launch enforces (divisibility, ZeRO-2/3 without
    pipeline, batch arithmetic) decide which exist."""
    model = cfg.model
    pipeline_sizes = [pp for pp in range(1, model.num_layers + 1) if model.num_layers % pp == 0]
    options = []
    for tp in range(1, MAX_TP + 1):
        for pp in pipeline_sizes:
            for zero in range(4):
                parallel = replace(cfg.parallel, tp=tp, pp=pp, dp=None, zero_stage=zero)
                try:
                    plan = validate(replace(cfg, parallel=parallel), world_size)
                except ConfigError:
                    continue
                for recompute in Recompute:
                    memory = estimate(model, plan, cfg.data.seq_len, cfg.train.precision,
                                      recompute)
                    if memory.fits(device_bytes):
                        options.append(PlanOption(plan, recompute, memory))
    return sorted(options, key=_cost)
