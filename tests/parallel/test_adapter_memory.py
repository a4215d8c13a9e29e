"""QLoRA's NF4 base in the memory estimate, per tensor-parallel shard: what each rank's NF4
shards really take, and the plans `tools/plan.py` offers a QLoRA run."""

import pytest
import torch

from llmscale.adapters import nf4
from llmscale.config import load_config
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import (
    ActivationCheckpointing, AdapterConfig, AdapterKind, ModelConfig, Precision,
)
from llmscale.parallel.adapter_memory import (
    COLUMN_PARALLEL, layer_quantized_parameters, projection_shapes,
)
from llmscale.parallel.memory_plan import GiB, estimate, fitting_plans

# Every projection, and each rank's rows of o_proj and down_proj at tp=2, in whole NF4 blocks.
MODEL = ModelConfig(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=512, vocab_size=256)
QLORA = AdapterConfig(kind=AdapterKind.qlora, rank=8, alpha=16.0, dropout=0.0)
LORA = AdapterConfig(kind=AdapterKind.lora, rank=8, alpha=16.0, dropout=0.0)


def stored_bytes(weight: torch.Tensor) -> int:
    """What an NF4 tensor holds: 4-bit codes, int8 block scales, their fp32 factors and mean."""
    return sum(part.numel() * part.element_size() for part in (
        weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
        weight.scaler_mean))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_nf4_bytes_are_counted_per_shard(tp):
    """A rank's NF4 shards of one layer take what the estimate counts, within 0.5% (a shard's
    scales are grouped in fewer than 256 when its block count calls for it)."""
    held = 0
    for name, (fan_in, fan_out) in projection_shapes(MODEL).items():
        weight = torch.randn(fan_out, fan_in)
        dim = 0 if name in COLUMN_PARALLEL else 1
        held += stored_bytes(nf4.quantize(weight.chunk(tp, dim=dim)[0]))
    counted = layer_quantized_parameters(MODEL, QLORA, tp) * nf4.BYTES_PER_WEIGHT
    assert abs(held - counted) / held < 0.005, (held, counted)


def test_qlora_under_tensor_parallelism_holds_each_ranks_share_in_nf4():
    plan = ParallelPlan(world_size=2, dp=1, tp=2, pp=1, zero_stage=1, micro_batch_size=1,
                        grad_accum_steps=1, global_batch_size=1)
    memory = {adapter.kind: estimate(MODEL, plan, 64, Precision.bf16,
                                     ActivationCheckpointing.none, adapter)
              for adapter in (LORA, QLORA)}
    projections = MODEL.num_layers * sum(i * o for i, o in projection_shapes(MODEL).values())
    saved = projections / 2 * (2 - nf4.BYTES_PER_WEIGHT)  # bf16 -> NF4, half of each per rank
    difference = memory[AdapterKind.lora].parameters - memory[AdapterKind.qlora].parameters
    assert difference == pytest.approx(saved)


def test_the_planner_offers_qlora_tensor_parallel_plans():
    """A 7B QLoRA run on 2 devices of 4 GiB: only a tensor-parallel plan holds each rank's share
    of the NF4 base."""
    cfg = load_config(["+exp=7b", "adapter=qlora", "train.micro_batch_size=1",
                       "train.global_batch_size=2", "data.seq_len=512"])
    options = fitting_plans(cfg, 2, 4 * GiB)
    assert options and {option.plan.tp for option in options} == {2}
    assert all(option.estimate.parameters < 2.5 * GiB for option in options)
