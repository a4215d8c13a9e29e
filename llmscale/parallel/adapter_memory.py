"""What LoRA and QLoRA change in the memory estimate (llmscale/parallel/memory_plan.py).

The base freezes: it has no gradients and no optimizer state, and its weights stay in the
model's dtype (2 bytes in bf16, 4 in fp32), or, for QLoRA's target projections, in NF4: half a
byte a weight, an int8 scale per block of 64 and an fp32 factor per 256 scales (0.516 bytes);
under tensor parallelism each rank holds its shard, quantised alone, so 1/tp of them.
The adapters, A [r, in] and B [out, r] per target projection, are what trains: weight,
gradient and AdamW state as for any trained parameter (under tensor parallelism a column-
parallel projection's B and a row-parallel one's A are split, the other replicated). lm_head,
frozen, makes no weight gradient.

Activations: the adapters read the inputs the base projections' backward already keeps (a
frozen projection's backward does not need its input, its A's does); each adds A's output,
r wide, which B's weight gradient needs, and with dropout the dropped input and its mask. The
frozen norms keep no normalised input, the first norm nothing (its input, the frozen
embedding's output, needs no gradient), and the frozen lm_head not its input. QLoRA
dequantises each weight for its product, forward and backward: torchao's dequantisation holds
two int64 code tensors of half the weight each and three tensors of its size in the model's
dtype at its fullest, (8 + 3e) bytes a weight of the largest projection, short-lived, and in
a projection's backward, not while SwiGLU's or a norm's backward holds its buffers."""

from typing import Dict, Optional, Tuple

from llmscale.adapters.nf4 import BYTES_PER_WEIGHT as NF4_BYTES_PER_WEIGHT
from llmscale.config.schema import ActivationCheckpointing, AdapterConfig, AdapterKind, ModelConfig

# Projections whose output tensor parallelism splits; the others split their input.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def adapted(adapter: Optional[AdapterConfig]) -> bool:
    return adapter is not None and adapter.kind is not AdapterKind.none


def projection_shapes(model: ModelConfig) -> Dict[str, Tuple[int, int]]:
    """(in, out) of each projection of a decoder layer."""
    h, i = model.hidden_size, model.intermediate_size
    kv = (model.num_kv_heads or model.num_heads) * (h // model.num_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def layer_adapter_parameters(model: ModelConfig, adapter: AdapterConfig, tp: int) -> float:
    """Adapter parameters of one decoder layer on one tensor-parallel rank."""
    count = 0.0
    for name in adapter.target_modules:
        fan_in, fan_out = projection_shapes(model)[name]
        if name in COLUMN_PARALLEL:
            count += adapter.rank * (fan_in + fan_out / tp)
        else:
            count += adapter.rank * (fan_in / tp + fan_out)
    return count


def layer_quantized_parameters(model: ModelConfig, adapter: AdapterConfig, tp: int) -> float:
    """Base weights of one decoder layer that QLoRA stores in NF4, on one rank."""
    if adapter.kind is not AdapterKind.qlora:
        return 0.0
    shapes = projection_shapes(model)
    return sum(shapes[name][0] * shapes[name][1] for name in adapter.target_modules) / tp


def frozen_weight_bytes(frozen_parameters: float, quantized: float, weight_bytes: int) -> float:
    """Bytes of the frozen base: NF4 for the `quantized` weights, the model's dtype for the
    rest."""
    return (frozen_parameters - quantized) * weight_bytes + quantized * NF4_BYTES_PER_WEIGHT


def layer_adapter_activation_bytes(model: ModelConfig, adapter: AdapterConfig,
                                   recompute: ActivationCheckpointing, e: int) -> float:
    """Bytes per token that one layer saves with adapters beyond (or, negative, short of) what
    it saves training every weight. Full checkpointing keeps the layer input alone either way;
    selective recomputes the norms and keeps every matmul's output, B's (out wide) too."""
    if recompute is ActivationCheckpointing.full:
        return 0.0
    shapes = projection_shapes(model)
    per_token = 0.0
    for name in adapter.target_modules:
        per_token += e * adapter.rank
        if adapter.dropout > 0:  # the dropped input and its bool mask
            per_token += (e + 1) * shapes[name][0]
        if recompute is ActivationCheckpointing.selective:
            per_token += e * shapes[name][1]
    if recompute is ActivationCheckpointing.none:
        per_token -= FROZEN_NORM_SAVING * e * model.hidden_size
    return per_token


def layer_adapter_recompute_bytes(model: ModelConfig, adapter: AdapterConfig,
                                  recompute: ActivationCheckpointing, e: int) -> float:
    """... and what full checkpointing's recomputation of a layer holds beyond a full model's:
    the layer without checkpointing, adapted."""
    if recompute is not ActivationCheckpointing.full:
        return 0.0
    return layer_adapter_activation_bytes(model, adapter, ActivationCheckpointing.none, e)


# A norm whose weight is frozen keeps no normalised input for the weight's gradient: two a
# layer.
FROZEN_NORM_SAVING = 2


def stage_adapter_activation_bytes(model: ModelConfig, recompute: ActivationCheckpointing,
                                   e: int, first: bool, last: bool) -> float:
    """Bytes per token a stage's ends save short of a full model's: the first layer's input,
    the frozen embedding's output, needs no gradient, so (without checkpointing) its first
    norm keeps nothing (its fp32 input and 1/rms); the final norm keeps no normalised input,
    and the frozen lm_head not its input."""
    h = model.hidden_size
    saving = 0.0
    if first and recompute is ActivationCheckpointing.none:
        saving += 4 * h + 4
    if last:
        saving += 2 * e * h
    return -saving


def dequantize_bytes(model: ModelConfig, adapter: AdapterConfig, tp: int, e: int) -> float:
    """QLoRA's short-lived dequantisation buffers at their fullest (the module docstring)."""
    if adapter.kind is not AdapterKind.qlora:
        return 0.0
    shapes = projection_shapes(model)
    largest = max(shapes[name][0] * shapes[name][1] for name in adapter.target_modules)
    return (8 + 3 * e) * largest / tp
