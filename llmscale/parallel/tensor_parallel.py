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
are summed over the tensor-parallel group (`sum_gradients_over_sequence_shards`). LoRA's
adapters on a projection are split with it (`ColumnParallelLoRA`, `RowParallelLoRA`); QLoRA's
are the same, over a frozen base each rank quantises to NF4 from its own shard
(`ColumnParallelQLoRA`, `RowParallelQLoRA`: its quantisation blocks are the shard's, not the
whole weight's). A model built on the meta device is split the same way and holds no values
until `llmscale.parallel.parallelize` gives each shard its own.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from llmscale.adapters.lora import LoRALinear
from llmscale.adapters.nf4 import FrozenNF4Weight
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


class _ShardedLoRA:
    """LoRA's adapters (`llmscale.adapters.lora`) on a tensor-parallel projection, split as the
    projection is: the adapter beside the projection's split dimension is split with it, the
    other one is whole on every rank. Each rank's dropout mask is its slice of the mask one
    process draws for the whole input (the same draws, from the default generator, which every
    rank seeds alike), so masks agree where the input is replicated and differ where it is
    split; on the CPU, where torch's dropout draws the same way, the masks are one process's."""

    def take_adapters(self, lora: LoRALinear, split: str, tp: int, rank: int) -> None:
        """`split`: which adapter ("lora_A" or "lora_B") shares the projection's split."""
        for name in ("lora_A", "lora_B"):
            full = getattr(lora, name).weight
            dim = (1 if name == "lora_A" else 0) if name == split else None
            shape = list(full.shape)
            if dim is not None:
                shape[dim] //= tp
            # Allocated on the CPU without drawing, as Megatron's layers are: attributes set on
            # a meta tensor would not survive its `to_empty`.
            adapter = nn.Linear(shape[1], shape[0], bias=False, device="meta").to_empty(
                device="cpu")
            if dim is not None:
                _copy_shard(adapter.weight, full, dim=dim, rank=rank)
            else:
                if self.sequence_parallel:  # whole, but it sees only this rank's tokens
                    adapter.weight.sequence_parallel = True
                if not full.is_meta:
                    with torch.no_grad():
                        adapter.weight.copy_(full)
            setattr(self, name, adapter)
        self.lora_dropout, self.scaling = lora.dropout.p, lora.scaling

    def _dropout(self, x: torch.Tensor, split_dim: Optional[int]) -> torch.Tensor:
        if not self.training or self.lora_dropout == 0 or split_dim is None:
            return F.dropout(x, self.lora_dropout, self.training)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        full_shape = list(x.shape)
        full_shape[split_dim] *= tp
        keep = torch.empty(full_shape, dtype=x.dtype, device=x.device).bernoulli_(
            1 - self.lora_dropout)
        mask = keep.chunk(tp, dim=split_dim)[parallel_state.get_tensor_model_parallel_rank()]
        return x * mask.div_(1 - self.lora_dropout)


class ColumnParallelLoRA(_ShardedLoRA, ColumnParallel):
    """A whole, B split by output. Under sequence parallelism A runs on this rank's tokens and
    its narrow output is gathered; otherwise the gradient reaching A is summed over the ranks
    (each holds part of B), as the projection does for its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.lora_A(self._dropout(x, 0 if self.sequence_parallel else None))
        down = (tensor_parallel.gather_from_sequence_parallel_region(down)
                if self.sequence_parallel
                else tensor_parallel.copy_to_tensor_model_parallel_region(down))
        return self.frozen_product(x) + self.lora_B(down) * self.scaling

    def frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        return ColumnParallel.forward(self, x)


class RowParallelLoRA(_ShardedLoRA, RowParallel):
    """A split by input, B whole: A's partial products are summed over the ranks (scattered
    over the sequence under sequence parallelism) before B, as the projection's outputs are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.sum_over_ranks(self.lora_A(self._dropout(x, x.dim() - 1)))
        return self.frozen_product(x) + self.lora_B(down) * self.scaling

    def frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        return RowParallel.forward(self, x)

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        return (tensor_parallel.reduce_scatter_to_sequence_parallel_region(partial)
                if self.sequence_parallel
                else tensor_parallel.reduce_from_tensor_model_parallel_region(partial))


class ColumnParallelQLoRA(FrozenNF4Weight, ColumnParallelLoRA):
    """ColumnParallelLoRA over this rank's rows of the base in NF4: the product megatron's layer
    computes (the whole input, gathered over the sequence under sequence parallelism), with the
    NF4 shard dequantised for it."""

    shard_dim = 0

    def frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        whole = (tensor_parallel.gather_from_sequence_parallel_region(x)
                 if self.sequence_parallel
                 else tensor_parallel.copy_to_tensor_model_parallel_region(x))
        return F.linear(whole, self.weight)


class RowParallelQLoRA(FrozenNF4Weight, RowParallelLoRA):
    """RowParallelLoRA over this rank's columns of the base in NF4, its partial products summed
    over the ranks as megatron's layer sums them."""

    shard_dim = 1

    def frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum_over_ranks(F.linear(x, self.weight))


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


def apply_tensor_parallel(model: Llama, sequence_parallel: bool, nf4_base: bool = False) -> None:
    """`nf4_base` (QLoRA): the adapted projections (LoRA layers on a full-precision base) become
    QLoRA layers, each rank quantising its shard of the base."""
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

    def column(linear: nn.Module) -> ColumnParallel:
        """`linear`: an `nn.Linear`, or a `LoRALinear` whose adapters are split alike."""
        out_features, in_features = linear.weight.shape
        lora = isinstance(linear, LoRALinear)
        layer = ((ColumnParallelQLoRA if nf4_base else ColumnParallelLoRA) if lora
                 else ColumnParallel)
        parallel = layer(in_features, out_features, config=config, init_method=nn.init.zeros_,
                         bias=False, gather_output=False)
        take_base(parallel, linear, dim=0)
        if lora:
            parallel.take_adapters(linear, "lora_B", tp, rank)
        return parallel

    def row(linear: nn.Module) -> RowParallel:
        out_features, in_features = linear.weight.shape
        lora = isinstance(linear, LoRALinear)
        layer = (RowParallelQLoRA if nf4_base else RowParallelLoRA) if lora else RowParallel
        parallel = layer(in_features, out_features, config=config, init_method=nn.init.zeros_,
                         bias=False, input_is_parallel=True, skip_bias_add=False)
        take_base(parallel, linear, dim=1)
        if lora:
            parallel.take_adapters(linear, "lora_A", tp, rank)
        return parallel

    def take_base(parallel: nn.Module, linear: nn.Module, dim: int) -> None:
        if isinstance(parallel, FrozenNF4Weight):  # quantises this rank's shard alone
            parallel.freeze(linear.weight.chunk(tp, dim=dim)[rank])
        else:
            _copy_shard(parallel.weight, linear.weight, dim=dim, rank=rank)

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


def sum_gradients_over_sequence_shards(model: nn.Module) -> None:
    """Under sequence parallelism each rank's norm weights see only its slice of the sequence,
    as do LoRA's whole adapters (marked `sequence_parallel`, as Megatron marks such weights).
    A hook on the leaf runs before the gradient is accumulated, so DeepSpeed's own hooks (and
    its ZeRO partitioning) see the summed gradient. (After any `to_empty`, which would replace
    the weights and drop the hooks.) Frozen weights (a LoRA run's norms) get no gradient."""
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    norms = {id(module.weight) for module in model.modules() if isinstance(module, RMSNorm)}
    for param in model.parameters():
        if param.requires_grad and (id(param) in norms or getattr(param, "sequence_parallel",
                                                                  False)):
            param.register_hook(all_reduce)


@torch.no_grad()
def _copy_shard(shard: torch.Tensor, full: torch.Tensor, dim: int, rank: int) -> None:
    # Megatron marks its shards only when it initialises them itself. DeepSpeed's gradient
    # clipping reads the mark: unmarked weights count as replicated, only tp rank 0's.
    set_tensor_model_parallel_attributes(shard, is_parallel=True, dim=dim, stride=1)
    shard.requires_grad_(full.requires_grad)  # a LoRA run's base stays frozen
    if not full.is_meta:  # a model built on the meta device gets its values after the split
        shard.copy_(full.chunk(full.shape[dim] // shard.shape[dim], dim=dim)[rank])
