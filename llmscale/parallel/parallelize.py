"""The plan applied to a built model: adapters, tensor/sequence or expert parallelism, the fused
loss, activation checkpointing, compilation, then the cut into pipeline stages. Data
parallelism and ZeRO are DeepSpeed's engine's part."""

from typing import List, Optional

import torch
from megatron.core import parallel_state
from torch import nn

from llmscale.adapters.lora import apply_lora, quantize_initial_bases
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import AdapterConfig, AdapterKind
from llmscale.models.llama import Llama
from llmscale.parallel.activation_checkpointing import apply_activation_checkpointing
from llmscale.parallel.compile import apply_compile
from llmscale.parallel.expert_parallel import apply_expert_parallel
from llmscale.parallel.pipeline import build_pipeline, local_stages, pipeline_stages
from llmscale.parallel.tensor_parallel import (
    apply_tensor_parallel, local_shard, sum_gradients_over_sequence_shards,
)


def parallelize(model: Llama, plan: ParallelPlan,
                adapter: Optional[AdapterConfig] = None) -> nn.Module:
    """`model` holds the same full weights on every rank (the same seed, or the same loaded
    weights), or, built on the meta device, only their shapes: then each rank allocates and
    draws the values of its own share alone (`model.initial_value`), one parameter at a time,
    and no rank ever holds the whole model. The result holds this rank's share. Needs
    `init_model_parallel`. QLoRA under tensor parallelism quantises each rank's shard of the
    base, not the whole weight: the split comes first."""
    shard_quantized = adapter is not None and adapter.kind is AdapterKind.qlora and plan.tp > 1
    if adapter is not None:
        apply_lora(model, adapter, quantize=not shard_quantized)
    if plan.tp > 1:
        apply_tensor_parallel(model, plan.sequence_parallel, nf4_base=shard_quantized)
    if plan.ep > 1:
        apply_expert_parallel(model, plan.ep)
    if plan.fused_loss:
        model.use_fused_loss()
    apply_activation_checkpointing(model, plan.activation_checkpointing)
    if plan.compile:
        apply_compile(model)
    stages = pipeline_stages(model) if plan.pp > 1 else [model]
    if any(param.is_meta for param in model.parameters()):
        _initialize_shards(local_stages(stages, plan) if plan.pp > 1 else stages, model, plan)
    module = build_pipeline(model, stages, plan) if plan.pp > 1 else model
    if plan.sequence_parallel:
        sum_gradients_over_sequence_shards(module)
    return module


@torch.no_grad()
def _initialize_shards(local: List[nn.Module], model: Llama, plan: ParallelPlan) -> None:
    for part in local:
        part.to_empty(device="cpu")
    if model.cfg.tie_embeddings:  # `to_empty` gave the two ends of a tied pair their own tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    # Other stages' parameters stay on the meta device, and out of the pipeline module.
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        full_shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            full_shape[param.partition_dim] *= plan.tp
        param.copy_(local_shard(param, model.initial_value(name, full_shape)))
    quantize_initial_bases(model, plan.tp, parallel_state.get_tensor_model_parallel_rank()
                           if plan.tp > 1 else 0)
    model.model.rotary_emb.to_empty(device="cpu")
    model.model.rotary_emb.reset_buffers()
