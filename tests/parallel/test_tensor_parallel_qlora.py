"""QLoRA under tensor parallelism: each rank quantises its own shard of the frozen base to NF4,
and its layers compute what one process's LoRA layer does on those dequantised shards put back
together. Both ranks of a 2-way split are made here in one process (a 1-rank group, where the
layers' collectives are identities): a column-parallel rank's output is its slice of the whole
output, a row-parallel rank's a part of a sum."""

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from single_rank import one_rank_process_group
from torch import nn

from llmscale.adapters import nf4
from llmscale.adapters.lora import LoRALinear, apply_lora, quantize_initial_bases
from llmscale.config.schema import AdapterConfig, AdapterKind, ModelConfig
from llmscale.models import Llama
from llmscale.parallel.megatron_cpu import allow_megatron_layers_on_cpu
from llmscale.parallel.tensor_parallel import (
    ColumnParallelQLoRA, RowParallelQLoRA, apply_tensor_parallel,
)

CPU_CONFIG = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False)
TP = 2


def lora_layer(in_features: int, out_features: int) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=False), rank=4, alpha=8.0,
                       dropout=0.0)
    layer.lora_B.weight.data.normal_(0, 0.1)  # away from zero, as trained, so that it counts
    return layer


def split(layer: LoRALinear, parallel_class, dim: int, **kwargs):
    """Each rank's QLoRA layer, quantised from its shard of `layer`'s base, and one process's
    LoRA layer on the dequantised shards put back together."""
    in_features, out_features = layer.lora_A.in_features, layer.lora_B.out_features
    ranks = []
    for rank in range(TP):
        shard = parallel_class(in_features, out_features, config=CPU_CONFIG, bias=False,
                               init_method=nn.init.zeros_, **kwargs)
        shard.freeze(layer.weight.chunk(TP, dim=dim)[rank])
        shard.take_adapters(layer, "lora_B" if dim == 0 else "lora_A", TP, rank)
        ranks.append(shard)
    reference = lora_layer(in_features, out_features)  # the same adapters
    reference.weight.data = torch.cat([nf4.dequantize(shard.weight) for shard in ranks], dim=dim)
    return ranks, reference


def adapter_grads(module: nn.Module):
    return module.lora_A.weight.grad, module.lora_B.weight.grad


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within 1e-6 of the largest entry (summed in another order than one layer sums)."""
    return bool((actual - expected).abs().max() <= 1e-6 * expected.abs().max())


def test_each_rank_quantises_its_own_shard_and_holds_no_copy_of_it():
    layer = lora_layer(128, 192)
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        ranks, reference = split(layer, ColumnParallelQLoRA, dim=0, gather_output=False)
    for rank, shard in enumerate(ranks):
        assert nf4.is_quantized(shard.weight) and shard.weight.shape == (96, 128)
        assert "weight" not in dict(shard.named_parameters())
        assert set(shard.state_dict()) == {"lora_A.weight", "lora_B.weight"}
        # Its own quantisation: the shard's blocks and scales, not the whole weight's.
        assert torch.equal(nf4.dequantize(shard.weight),
                           nf4.dequantize(nf4.quantize(layer.weight.chunk(TP)[rank])))
    whole = nf4.dequantize(nf4.quantize(layer.weight))
    assert not torch.equal(reference.weight, whole)  # the scales' mean is the shard's own
    assert (reference.weight - whole).abs().max() < 0.02 * layer.weight.abs().max()


def test_column_parallel_qlora_is_lora_on_the_dequantised_shards():
    layer = lora_layer(128, 192)
    x = torch.randn(5, 3, 128, requires_grad=True)
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        ranks, reference = split(layer, ColumnParallelQLoRA, dim=0, gather_output=False)
        outputs = [shard(x) for shard in ranks]
        torch.cat(outputs, dim=-1).pow(2).sum().backward()
    expected = reference(x)
    assert (torch.cat(outputs, dim=-1) - expected).abs().max() < 1e-6
    input_grad = x.grad.clone()
    x.grad = None
    expected.pow(2).sum().backward()
    assert close(input_grad, x.grad)
    grad_a, grad_b = adapter_grads(reference)
    # A is whole on each rank (its gradients summed over the ranks), B split by output.
    assert close(sum(shard.lora_A.weight.grad for shard in ranks), grad_a)
    assert close(torch.cat([s.lora_B.weight.grad for s in ranks]), grad_b)


def test_row_parallel_qlora_is_lora_on_the_dequantised_shards():
    layer = lora_layer(128, 192)
    x = torch.randn(5, 3, 128)
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        ranks, reference = split(layer, RowParallelQLoRA, dim=1, input_is_parallel=True,
                                 skip_bias_add=False)
        output = sum(shard(part) for shard, part in zip(ranks, x.chunk(TP, dim=-1)))
        output.pow(2).sum().backward()
    expected = reference(x)
    assert (output - expected).abs().max() < 1e-6
    expected.pow(2).sum().backward()
    grad_a, grad_b = adapter_grads(reference)
    # A split by input, B whole (each simulated rank sees its part of A's sum here).
    assert close(torch.cat([s.lora_A.weight.grad for s in ranks], dim=1), grad_a)
    assert close(sum(shard.lora_B.weight.grad for shard in ranks), grad_b)


def test_a_split_model_quantises_each_shard_from_loaded_or_drawn_weights():
    """Eager (loaded weights) and meta (drawn by name) builds give each rank the same NF4 shards:
    those of the whole weight's shard, quantised alone."""
    cfg = ModelConfig(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, vocab_size=128, tie_embeddings=False)
    qlora = AdapterConfig(kind=AdapterKind.qlora, rank=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(3)
    eager = Llama(cfg)
    whole = {name: tensor.clone() for name, tensor in eager.state_dict().items()}
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = Llama(cfg)
    with one_rank_process_group():
        allow_megatron_layers_on_cpu()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        for model in (eager, meta):
            apply_lora(model, qlora, quantize=False)
            apply_tensor_parallel(model, sequence_parallel=False, nf4_base=True)
        meta.to_empty(device="cpu")
        quantize_initial_bases(meta, tp=1, rank=0)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        eager_layer, meta_layer = eager.get_submodule(name), meta.get_submodule(name)
        assert isinstance(eager_layer, (ColumnParallelQLoRA, RowParallelQLoRA))
        expected = nf4.dequantize(nf4.quantize(whole[f"{name}.weight"]))
        assert torch.equal(nf4.dequantize(eager_layer.weight), expected), name
        assert torch.equal(nf4.dequantize(meta_layer.weight), expected), name
    # A meta build at tp=2: each rank draws the whole weight by its name and keeps its shard.
    with torch.device("meta"):
        torch.manual_seed(3)
        half = Llama(cfg)
    layer = RowParallelQLoRA.__new__(RowParallelQLoRA)
    nn.Module.__init__(layer)
    layer.freeze(torch.empty(128, 128, device="meta"))
    half.model.layers[0].self_attn.o_proj = layer
    layer.to_empty(device="cpu")
    quantize_initial_bases(half, tp=2, rank=1)
    drawn = half.initial_value("model.layers.0.self_attn.o_proj.weight", [128, 256])
    assert torch.equal(nf4.dequantize(layer.weight),
                       nf4.dequantize(nf4.quantize(drawn.chunk(2, dim=1)[1])))
