"""A tensor-parallel model's own state_dict loads back into it: what a same-layout resume and a
rollback do (DeepSpeed loads the saved module strictly). LoRA's adapters split with their
projections and compute what the plain layers do."""

import copy

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from single_rank import one_rank_process_group

from llmscale.adapters.lora import apply_lora, is_adapter
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig
from llmscale.models import Llama
from llmscale.parallel.megatron_cpu import allow_megatron_layers_on_cpu
from llmscale.parallel.tensor_parallel import (
    ColumnParallelLoRA, RowParallelLoRA, apply_tensor_parallel,
)


def test_state_dict_round_trips_strictly_without_extra_state():
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        torch.manual_seed(0)
        model = Llama(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                  intermediate_size=48, vocab_size=64, tie_embeddings=False))
        apply_tensor_parallel(model, sequence_parallel=False)
        saved = model.state_dict()
        # Checkpoint tools (ds_to_universal) take every entry for a tensor.
        assert not [name for name in saved if name.endswith("_extra_state")]
        result = model.load_state_dict(saved, strict=True)
        assert not result.missing_keys and not result.unexpected_keys


LORA = AdapterConfig(kind=AdapterKind.lora, rank=4, alpha=8.0, dropout=0.0)
CPU_CONFIG = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False)


def adapted_model() -> Llama:
    torch.manual_seed(0)
    model = Llama(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, vocab_size=64, tie_embeddings=False))
    apply_lora(model, LORA)
    for name, param in model.named_parameters():  # B away from zero, so that it counts
        if name.endswith("lora_B.weight"):
            param.data.normal_()
    return model


def test_lora_adapters_split_as_their_projections_and_the_base_stays_frozen():
    """Each rank's adapters of a 2-way split (made here for both ranks in one process) put back
    together give the whole ones: B by output beside a column-parallel projection, A by input
    beside a row-parallel one, the other adapter whole."""
    full = adapted_model()
    column, row = full.model.layers[0].self_attn.q_proj, full.model.layers[0].mlp.down_proj
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        parallel = copy.deepcopy(full)
        apply_tensor_parallel(parallel, sequence_parallel=False)
        assert not [n for n, p in parallel.named_parameters() if p.requires_grad != is_adapter(n)]
        ranks = [ColumnParallelLoRA(32, 128, config=CPU_CONFIG, bias=False,
                                    init_method=torch.nn.init.zeros_) for _ in range(2)]
        for rank, shard in enumerate(ranks):
            shard.take_adapters(column, "lora_B", tp=2, rank=rank)
        assert all(torch.equal(shard.lora_A.weight, column.lora_A.weight) for shard in ranks)
        assert torch.equal(torch.cat([s.lora_B.weight for s in ranks]), column.lora_B.weight)
        assert ranks[0].lora_B.weight.partition_dim == 0
        assert not getattr(ranks[0].lora_A.weight, "tensor_model_parallel", False)
        ranks = [RowParallelLoRA(48, 32, config=CPU_CONFIG, bias=False,
                                 init_method=torch.nn.init.zeros_, input_is_parallel=True,
                                 skip_bias_add=False) for _ in range(2)]
        for rank, shard in enumerate(ranks):
            shard.take_adapters(row, "lora_A", tp=2, rank=rank)
        assert torch.equal(torch.cat([s.lora_A.weight for s in ranks], 1), row.lora_A.weight)
        assert ranks[1].lora_A.weight.partition_dim == 1
        assert all(torch.equal(shard.lora_B.weight, row.lora_B.weight) for shard in ranks)


def test_lora_on_megatron_layers_computes_what_the_plain_layers_do():
    full = adapted_model()
    input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    full(input_ids, labels=input_ids).backward()
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        parallel = adapted_model()
        apply_tensor_parallel(parallel, sequence_parallel=False)
        parallel(input_ids, labels=input_ids).backward()
    grads = dict(parallel.named_parameters())
    for name, param in full.named_parameters():
        if is_adapter(name):
            assert (grads[name].grad - param.grad).abs().max() < 1e-6, name


def test_split_dropout_masks_are_slices_of_the_whole_inputs_mask(monkeypatch):
    """Each rank of a split input draws the mask of the whole input and keeps its slice: the
    same draws as one process, which (on the CPU) makes the same mask."""
    x = torch.randn(6, 2, 8)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.5, training=True)
    layer = RowParallelLoRA.__new__(RowParallelLoRA)
    torch.nn.Module.__init__(layer)
    layer.lora_dropout = 0.5
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    for rank, part in enumerate(x.chunk(2, dim=2)):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: rank)
        torch.manual_seed(5)
        assert torch.equal(layer._dropout(part, split_dim=2), expected.chunk(2, dim=2)[rank])
