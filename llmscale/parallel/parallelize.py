"""The plan applied to a built model: tensor/sequence or expert parallelism, activation
checkpointing, then the cut into pipeline stages. Data parallelism and ZeRO are DeepSpeed's engine's part."""

from torch import nn

from llmscale.config.validate import ParallelPlan
from llmscale.models.llama import Llama
from llmscale.parallel.activation_checkpointing import apply_activation_checkpointing
from llmscale.parallel.expert_parallel import apply_expert_parallel
from llmscale.parallel.pipeline import build_pipeline
from llmscale.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: Llama, plan: ParallelPlan) -> nn.Module:
    """`model` holds the full weights on every rank (the same seed, or the same loaded
    weights); the result holds this rank's share of them. Needs `init_model_parallel`."""
    if plan.tp > 1:
        apply_tensor_parallel(model, plan.sequence_parallel)
    if plan.ep > 1:
        apply_expert_parallel(model, plan.ep)
    apply_activation_checkpointing(model, plan.activation_checkpointing)
    if plan.pp > 1:
        return build_pipeline(model, plan)
    return model
