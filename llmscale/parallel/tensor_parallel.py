"""Tensor and sequence parallelism applied to a built `Llama` from outside (Megatron's recipe).

Each rank builds the full model (or only its shape, on the meta device), then every
attention and MLP projection, the embedding and the output layer are replaced by megatron-core's
parallel layers holding this rank's share of the same weights, so any tp gives the same model:
  q/k/v, gate/up, lm_head   column-parallel (output features split; whole heads per rank)
  o_proj, down_proj         row-parallel (input features split; outputs summed over ranks)
  embed_tokens              vocabulary-parallel
and the loss becomes megatron's vocabulary-parallel cross-entropy, so full logits never exist.
With sequence parallelism the residual stream and norms between those regions hold a 1/tp
slice of the sequence; the norm weights then see only their slice's tokens, so their gradients
are summed over the tensor-parallel group (`sum_norm_gradients_over_sequence_shards`). A model
built on the meta device is split the same way and holds no values until
`llmscale.parallel.parallelize` gives each shard its own.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from llmscale.models.llama import IGNORE_INDEX, Llama, RMSNorm


class _WithoutExtraState:
    """megatron's linear layers put an empty `_extra_state` entry (for TransformerEngine's FP8
    metadata) into every state_dict; checkpoint tools take each entry for a tensor, so none is
    saved. Loading keeps megatron's `set_extra_state`: a pre-hook of its layers adds the entry
    to every state_dict they load, and that method is what takes it (without it, a strict
    load of the layer's own state_dict fails on an unexpected `_extra_state` key)."""

    get_extra_state = nn.Module.get_extra_state


class ColumnParallel(_WithoutExtraState, tensor_parallel.ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # megatron returns (output, bias)


class RowParallel(_WithoutExtraState, tensor_parallel.RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sequence-first ids [S, B] as everywhere in the model; megatron's sequence-parallel
        path expects [B, S] and transposes them itself."""
        return super().forward(input_ids.t() if self.reduce_scatter_embeddings else input_ids)


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`token_cross_entropy` over vocabulary-sharded logits [S, B, V/tp]."""
    ignored = labels == IGNORE_INDEX
    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float(), labels.masked_fill(ignored, 0))
    return losses.masked_fill(ignored, 0.0)


def apply_tensor_parallel(model: Llama, sequence_parallel: bool) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        # Weights are copied in below: Megatron only allocates them, on the CPU.
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
    )

    def column(linear: nn.Linear) -> ColumnParallel:
        parallel = ColumnParallel(linear.in_features, linear.out_features, config=config,
                                  init_method=nn.init.zeros_, bias=False, gather_output=False)
        _copy_shard(parallel.weight, linear.weight, dim=0, rank=rank)
        return parallel

    def row(linear: nn.Linear) -> RowParallel:
        parallel = RowParallel(linear.in_features, linear.out_features, config=config,
                               init_method=nn.init.zeros_, bias=False, input_is_parallel=True,
                               skip_bias_add=False)
        _copy_shard(parallel.weight, linear.weight, dim=1, rank=rank)
        return parallel

    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.q_proj, attention.k_proj, attention.v_proj = (
            column(attention.q_proj), column(attention.k_proj), column(attention.v_proj))
        attention.o_proj = row(attention.o_proj)
        mlp.gate_proj, mlp.up_proj = column(mlp.gate_proj), column(mlp.up_proj)
        mlp.down_proj = row(mlp.down_proj)

    embedding = model.model.embed_tokens
    parallel_embedding = VocabParallelEmbedding(
        embedding.num_embeddings, embedding.embedding_dim, init_method=nn.init.zeros_,
        reduce_scatter_embeddings=sequence_parallel, config=config)
    _copy_shard(parallel_embedding.weight, embedding.weight, dim=0, rank=rank)
    model.model.embed_tokens = parallel_embedding
    model.lm_head = column(model.lm_head)
    if model.cfg.tie_embeddings:
        # The vocabulary-parallel embedding and a column-parallel lm_head split the same
        # [V, H] matrix the same way, so the tie survives the split.
        model.lm_head.weight = parallel_embedding.weight
    model.token_losses = vocab_parallel_token_losses


def local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's share of the full value of `param` (megatron-core marks its shards)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(parallel_state.get_tensor_model_parallel_world_size(),
                      dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]


def sum_norm_gradients_over_sequence_shards(model: nn.Module) -> None:
    """Under sequence parallelism each rank's norm weights see only its slice of the sequence.
    A hook on the leaf runs before the gradient is accumulated, so DeepSpeed's own hooks (and
    its ZeRO partitioning) see the summed gradient. (After any `to_empty`, which would replace
    the weights and drop the hooks.)"""
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.register_hook(all_reduce)


@torch.no_grad()
def _copy_shard(shard: torch.Tensor, full: torch.Tensor, dim: int, rank: int) -> None:
    # Megatron marks its shards only when it initialises them itself. DeepSpeed's gradient
    # clipping reads the mark: unmarked weights count as replicated, only tp rank 0's.
    set_tensor_model_parallel_attributes(shard, is_parallel=True, dim=dim, stride=1)
    if not full.is_meta:  # a model built on the meta device gets its values after the split
        shard.copy_(full.chunk(full.shape[dim] // shard.shape[dim], dim=dim)[rank])
