"""Memory per device of a parallel plan, from the config alone, and the plans that fit a device.

Model states follow ZeRO (Rajbhandari et al., 2020): AdamW keeps, per parameter, the weight,
its gradient and the optimizer state (bf16 training: 2 + 2 bytes and an fp32 master copy plus
two fp32 moments, 12 bytes; fp32 training: 4 + 4 and the two moments, 8 bytes). ZeRO-1 shards
the optimizer state over the data-parallel group, ZeRO-2 the gradients too, ZeRO-3 also the
weights. Tensor parallelism splits every attention/MLP matrix and the vocabulary (norms are
replicated); pipeline parallelism gives each stage num_layers / pp layers, the first stage the
embedding and the last the final norm and lm_head (a tied lm_head is a second copy there, as in
Megatron, since the two ends sit on different devices).

Activations are what autograd saves in llmscale's Llama layer (llmscale/models/llama.py),
counted tensor by tensor, in bytes per token with e bytes per element (2 in bf16, 4 in fp32),
hidden size h, KV width kv = kv_heads * head_dim, intermediate size i, a heads:
  each RMSNorm (two a layer)  its input in fp32 (4h; in fp32 training, the input itself),
                              1/rms (4) and the normalised input (e*h)
  q/k/v and gate/up inputs    the norms' outputs, e*h each
  attention                   q and k after RoPE, v (e*(h + 2kv)); the output (e*h, which is
                              also o_proj's input: same storage); the logsumexp (4a). SDPA's
                              flash kernels never keep the s x s scores, so no 5*a*s/h term.
  SwiGLU                      gate output, its SiLU, up output and their product (4e*i)
  per layer                   none       (8 + 6e)*h + 2e*kv + 4e*i + 4a + 8
                              selective  the layer input, the matmul outputs (q, k, v, o, gate,
                                         up, down) and attention's: e*(5h + 2kv + 2i) + 4a
                              full       the layer input: e*h
The norms and the projections' inputs sit in the sequence-parallel region, divided by tp only
with sequence parallelism; the column-parallel outputs and attention are split over heads or i,
always divided by tp; the row-parallel outputs (o_proj, down_proj: 2e*h, kept by selective) are
each rank's partial sum of the whole [s, b, h], before the all-reduce or reduce-scatter, never
divided. The last stage adds the final norm, lm_head's input and the cross-entropy's fp32
log-probabilities (Megatron's vocabulary-parallel one: the softmax, 4V/tp). With sequence
parallelism Megatron all-gathers every column-parallel layer's input into one [s, b, h] buffer,
allocated in the first step and kept (`buffers`). Under 1F1B the stage i of pp holds pp - i
micro-batches in flight, so the first stage
holds pp of them (Korthikanti et al., 2022, whose GPT-3 formula s*b*h*(34 + 5*a*s/h) this
replaces: it counts dropout masks and attention scores our layer does not keep, and neither
SwiGLU's four i-wide tensors nor the fp32 norm inputs it does).

The step is fullest at one of three moments, and `total` is the fullest, not the sum of the
parts (the gradients, the activations and the temporaries peak at different times):
  backward start  all activations, plus the output layer's backward buffers (tp 1: the
                  loss's two fp32 [tokens, V] gradients; tp > 1: the vocabulary-parallel loss
                  writes its gradient over its softmax, and lm_head's input gradient and weight
                  gradient count; `output_backward_bytes`) or (once the output layer's
                  activations are freed) a layer's backward buffers; the gradients only if
                  earlier micro-batches of the step accumulated them (with one micro-batch,
                  plain torch and DeepSpeed ZeRO-0 start from none and allocate them as the
                  activations are freed)
  backward end    all gradients, the first layer's activations, a layer's backward buffers
  optimizer step  all gradients and AdamW's temporary (torch's foreach AdamW, the GPU default,
                  allocates sqrt(v) for every parameter it steps: 4 bytes each)
A layer's backward buffers are what checkpointing recomputes (full: the whole layer but its
input; selective: the norms, their outputs, q after RoPE, SiLU(gate) and the product, less the
kept o_proj and down_proj outputs, which the recomputation consumes and frees), the gradient of
the layer output (e*h) and the fuller of SwiGLU's backward, which holds the gradients of its two
factors (2e*i), and the post-attention RMSNorm's, whose five fp32 [tokens, h] temporaries (20h)
come once SwiGLU's four i-wide tensors and the norm's two outputs (4e*i + 2e*h) are freed. With
tp 1 SwiGLU's is the fuller for any i above 4h/3 (bf16); with tp > 1 and no sequence
parallelism the norm's, whole on every rank, often is.

Checked against measurement (tools/measure_memory.py, tests/bench/test_measured_memory.py):
the peak bytes of live tensors of a CPU training step (fp32, torch AdamW, one micro-batch) of
2-8 layer models, h 128-512, GQA and MHA, vocabulary 320-8192, seq 128-512, micro-batch 2-8,
in each checkpointing mode, are within 2.8% of the estimate (18 configurations, where the
paper's formula was -60% to +144% off) and the saved activations within 1.2%, in bf16 too.
At tp 2 (--tensor-parallel: Megatron's layers on 2 gloo ranks, each rank's own shard of the
weights, gradients and AdamW state), without and with sequence parallelism, the fuller rank's
peak is within 2.5% (30 fp32 configurations; before the row-parallel outputs, the all-gather
buffer, the vocabulary-parallel loss and the norms' backward were counted, -8% to +8%), the
activations within 1.7%, and in bf16 the step beyond the states within 1%.
Not covered, and left to the margin: the CUDA context, NCCL buffers, DeepSpeed's own buffers
(ZeRO-2/3 buckets, BF16_Optimizer's fp32 gradients), ZeRO-3's gathered layers and prefetch,
MoE routing buffers (an MoE layer counts as a SwiGLU of top_k * capacity_factor * i), cuBLAS
workspaces and allocator fragmentation; GPU kernels may differ from the CPU ones in what they
save (the attention output's layout decides whether o_proj's input is a copy).
"""

from dataclasses import dataclass, replace
from typing import List, Optional

from llmscale.config.load import ConfigError
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import (
    ActivationCheckpointing,
    AdapterConfig,
    LLMScaleConfig,
    ModelConfig,
    Precision,
)
from llmscale.config.validate import validate
from llmscale.models.flops import layer_matmul_parameters
from llmscale.parallel.adapter_memory import (
    adapted,
    dequantize_bytes,
    frozen_weight_bytes,
    layer_adapter_activation_bytes,
    layer_adapter_parameters,
    layer_adapter_recompute_bytes,
    layer_quantized_parameters,
    stage_adapter_activation_bytes,
)

GiB = 1024**3
# Share of the device kept free for what the estimate leaves out (see the module docstring);
# 10% is the headroom commonly left for allocator fragmentation and workspaces.
MARGIN = 0.10
MAX_TP = 8  # one node's NVLink domain; beyond it tensor parallelism crosses the network
ADAMW_TEMPORARY_BYTES = 4  # foreach AdamW's sqrt(exp_avg_sq), fp32, per parameter it steps
# Least recomputation first.
RECOMPUTE_ORDER = (ActivationCheckpointing.none, ActivationCheckpointing.selective,
                   ActivationCheckpointing.full)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the device that needs the most: the first or the last pipeline stage.

    The parts are the most of each kind at any time of the step; `total` is the most at one
    moment, `moment` names it (see the module docstring)."""

    stage: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float  # saved for the backward pass by every micro-batch in flight
    temporaries: float  # the largest short-lived buffers: the backward's or AdamW's
    total: float
    moment: str
    buffers: float = 0.0  # kept from the first step on: sequence parallelism's all-gather buffer

    def fits(self, device_bytes: float) -> bool:
        return self.total <= (1 - MARGIN) * device_bytes


@dataclass(frozen=True)
class PlanOption:
    plan: ParallelPlan
    recompute: ActivationCheckpointing
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


def activation_bytes_per_element(precision: Precision) -> int:
    return 4 if precision == Precision.fp32 else 2


def _widths(model: ModelConfig):
    h = model.hidden_size
    kv = (model.num_kv_heads or model.num_heads) * (h // model.num_heads)
    intermediate = model.intermediate_size
    if model.num_experts:  # each token's SwiGLU activations in its top-k experts, up to capacity
        intermediate *= model.moe_top_k * model.moe_capacity_factor
    return h, kv, intermediate, model.num_heads


def layer_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                           recompute: ActivationCheckpointing, precision: Precision,
                           sequence_parallel: bool = True) -> float:
    """Bytes one decoder layer saves for its backward pass, per micro-batch and tensor-parallel
    rank (the module docstring lists the tensors)."""
    e = activation_bytes_per_element(precision)
    h, kv, i, a = _widths(model)
    sp = tp if sequence_parallel else 1
    whole = 0.0
    if recompute == ActivationCheckpointing.full:
        sequence_region, tensor_region = e * h, 0.0
    elif recompute == ActivationCheckpointing.selective:
        sequence_region = e * h  # the layer input
        # The column-parallel matmuls' outputs (q, k, v, gate, up) and attention's are split
        # over heads or i; the row-parallel ones (o_proj, down_proj) are every rank's partial
        # sum of the whole [s, b, h], before the all-reduce or reduce-scatter.
        tensor_region = e * (h + 2 * kv + 2 * i) + e * h + 4 * a
        whole = 2 * e * h
    else:
        norms = 2 * ((4 + e) * h + 4)
        projection_inputs = 2 * e * h
        sequence_region = norms + projection_inputs
        attention = e * (h + 2 * kv) + e * h + 4 * a
        tensor_region = attention + 4 * e * i
    return seq_len * micro_batch * (sequence_region / sp + tensor_region / tp + whole)


def output_layer_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                       precision: Precision, sequence_parallel: bool = True) -> float:
    """Bytes the last stage's final norm, lm_head and loss save, per micro-batch."""
    e = activation_bytes_per_element(precision)
    h = model.hidden_size
    sp = tp if sequence_parallel else 1
    norm_and_lm_head_input = (4 + e) * h + 4 + e * h
    return seq_len * micro_batch * (norm_and_lm_head_input / sp + 4 * model.vocab_size / tp)


# RMSNorm's backward holds five fp32 [tokens, h] temporaries at once (the gradient through the
# normalisation, the mean's, the square's three), whatever the activation dtype.
NORM_BACKWARD_BYTES = 5 * 4


def output_backward_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                          precision: Precision = Precision.fp32, sequence_parallel: bool = True,
                          lm_head_gradient: float = 0.0) -> float:
    """Buffers of the output layer's backward, the first of the backward pass, beyond all the
    activations (which include the loss's fp32 [tokens, V/tp] log-probabilities or softmax), per
    micro-batch; `lm_head_gradient`: bytes of lm_head's weight gradient, when its backward
    allocates it. The fullest of three moments:
      the loss's backward  tp 1: torch's cross-entropy, the fp32 gradients of the log-
                           probabilities and of the logits (8V). tp > 1: Megatron's vocabulary-
                           parallel cross-entropy writes the logits' gradient over its softmax;
                           in bf16 the backward of the cast to fp32 copies it (2V/tp)
      lm_head's backward   the logits' gradient in the activation dtype, the fp32 one and the
                           log-probabilities or softmax freed; its input's gradient, a whole
                           [s, b, h] on every rank (with tp > 1 a partial sum, all-reduced in
                           place, or with sequence parallelism reduce-scattered into a new s/tp
                           slice); the weight gradient
      the final norm's     its temporaries, the logits' gradient, lm_head's input and the
      backward             norm's output freed"""
    e = activation_bytes_per_element(precision)
    h, vocab = model.hidden_size, model.vocab_size / tp
    sp = tp if sequence_parallel else 1
    loss = 2 * 4 * vocab if tp == 1 else (e * vocab if e < 4 else 0)
    input_gradient = e * h * (1 + 1 / sp if sp > 1 else 1)
    lm_head = e * vocab - 4 * vocab + input_gradient
    final_norm = (NORM_BACKWARD_BYTES * h - 2 * e * h) / sp - 4 * vocab
    tokens = seq_len * micro_batch
    return max(tokens * loss, tokens * lm_head + lm_head_gradient, tokens * final_norm)


def layer_backward_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                         recompute: ActivationCheckpointing, precision: Precision,
                         sequence_parallel: bool = True) -> float:
    """Short-lived buffers of one layer's backward, per micro-batch and tensor-parallel rank:
    what checkpointing recomputes and, with the gradient of the layer output, the fuller of
    SwiGLU's backward, which holds the gradients of its two factors, and the post-attention
    norm's, by which SwiGLU's four i-wide tensors and the norm's two outputs are gone."""
    e = activation_bytes_per_element(precision)
    h, kv, i, a = _widths(model)
    sp = tp if sequence_parallel else 1
    # In fp32 the first norm's fp32 input is the layer input, which checkpointing keeps; in bf16
    # it is a copy, recomputed.
    kept_input = 4 * h if e == 4 else 0
    whole = 0.0
    if recompute == ActivationCheckpointing.full:  # the whole none layer, bar its input
        sequence_region = 2 * ((4 + e) * h + 4) + 2 * e * h - kept_input
        tensor_region = e * (h + 2 * kv) + e * h + 4 * a + 4 * e * i
    elif recompute == ActivationCheckpointing.selective:
        # The norms and their outputs, q after RoPE (k's takes the kept k's place), SiLU and
        # the product come back; the kept row-parallel outputs (o_proj, down_proj), which only
        # the residual adds read, are freed as the recomputation consumes them.
        sequence_region = 2 * ((4 + e) * h + 4) - kept_input + 2 * e * h
        tensor_region = e * h + 2 * e * i
        whole = -2 * e * h
    else:
        sequence_region = tensor_region = 0
    swiglu = 2 * e * i / tp  # the gradients of SiLU(gate) and up
    norm = (NORM_BACKWARD_BYTES * h - 2 * e * h) / sp - 4 * e * i / tp
    per_token = (sequence_region / sp + tensor_region / tp + whole
                 + e * h / sp  # the gradient of the layer output
                 + max(swiglu, norm))
    return seq_len * micro_batch * per_token


def estimate(model: ModelConfig, plan: ParallelPlan, seq_len: int, precision: Precision,
             recompute: ActivationCheckpointing,
             adapter: Optional[AdapterConfig] = None) -> MemoryEstimate:
    """Memory of the first and the last pipeline stage; returns the larger. With `adapter`
    (LoRA, QLoRA) only the adapters train (llmscale/parallel/adapter_memory.py)."""
    weight, grad = (2, 2) if precision == Precision.bf16 else (4, 4)
    optimizer = 16 - weight - grad
    dp, zero, tp = plan.dp, plan.zero_stage, plan.tp
    shape = (model, seq_len, plan.micro_batch_size, tp)
    sp = plan.sequence_parallel
    layers = model.num_layers // plan.pp
    # Megatron's sequence-parallel all-gathers (the column-parallel layers' inputs, in the
    # forward and again in the backward) all write into one [s, b, h] buffer, allocated in the
    # first step and kept.
    buffers = (seq_len * plan.micro_batch_size * model.hidden_size
               * activation_bytes_per_element(precision) if sp and tp > 1 else 0.0)
    layer = layer_activation_bytes(*shape, recompute, precision, sp)
    layer_backward = layer_backward_bytes(*shape, recompute, precision, sp)
    fine_tuning = adapted(adapter)
    if fine_tuning:
        e = activation_bytes_per_element(precision)
        layer += (seq_len * plan.micro_batch_size
                  * layer_adapter_activation_bytes(model, adapter, recompute, e))
        layer_backward += (seq_len * plan.micro_batch_size
                           * layer_adapter_recompute_bytes(model, adapter, recompute, e))
        # QLoRA dequantises a weight in a projection's backward, not in SwiGLU's or a norm's.
        layer_backward = max(layer_backward, dequantize_bytes(model, adapter, tp, e))
    # Gradients already exist when the backward pass starts if an earlier micro-batch of the
    # step made them (accumulation, and every pipeline schedule); else it allocates them as it
    # frees the activations.
    accumulating = plan.grad_accum_steps > 1
    estimates = []
    for stage in sorted({0, plan.pp - 1}):
        params = stage_parameters(model, tp, plan.pp, stage)
        weights, trained = params * weight, params
        if fine_tuning:
            trained = layers * layer_adapter_parameters(model, adapter, tp)
            weights = (frozen_weight_bytes(params, layers * layer_quantized_parameters(
                model, adapter, tp), weight) + trained * weight)
        states = (weights / (dp if zero >= 3 else 1),
                  trained * grad / (dp if zero >= 2 else 1),
                  trained * optimizer / (dp if zero >= 1 else 1))
        gradients = states[1]
        per_micro_batch = layers * layer
        if fine_tuning:
            per_micro_batch += seq_len * plan.micro_batch_size * stage_adapter_activation_bytes(
                model, recompute, activation_bytes_per_element(precision), stage == 0,
                stage == plan.pp - 1)
        backward_buffers = start_buffers = layer_backward
        if stage == plan.pp - 1:
            # The loss's backward runs with the output layer's activations; the layers' after
            # they are freed. Without earlier micro-batches lm_head's weight gradient is new.
            output_layer = output_layer_bytes(*shape, precision, sp)
            per_micro_batch += output_layer
            lm_head_gradient = (0 if accumulating or fine_tuning
                                else model.vocab_size * model.hidden_size / tp * grad)
            backward_buffers = max(output_backward_bytes(*shape, precision, sp),
                                   layer_backward - output_layer)
            start_buffers = max(
                output_backward_bytes(*shape, precision, sp, lm_head_gradient),
                layer_backward - output_layer)
        in_flight = plan.pp - stage
        activations = per_micro_batch * in_flight
        optimizer_buffers = ADAMW_TEMPORARY_BYTES * trained / (dp if zero >= 1 else 1)
        moments = {
            "backward start": activations + start_buffers + (gradients if accumulating else 0),
            "backward end": ((in_flight - 1) * per_micro_batch + layer + layer_backward
                             + gradients),
            "optimizer step": gradients + optimizer_buffers,
        }
        moment = max(moments, key=moments.get)
        estimates.append(MemoryEstimate(
            stage=stage,
            parameters=states[0],
            gradients=gradients,
            optimizer=states[2],
            activations=activations,
            temporaries=max(backward_buffers, optimizer_buffers),
            total=states[0] + states[2] + buffers + moments[moment],
            moment=moment,
            buffers=buffers,
        ))
    return max(estimates, key=lambda e: e.total)


def _cost(option: PlanOption) -> tuple:
    """Cheaper first: less model parallelism (communication, pipeline bubble), then less
    recomputation, then a lower ZeRO stage (less communication), then pipeline over tensor
    parallelism at equal product (tensor parallelism communicates every layer)."""
    recompute_rank = RECOMPUTE_ORDER.index(option.recompute)
    plan = option.plan
    return (plan.tp * plan.pp, recompute_rank, plan.zero_stage, plan.tp)


def fitting_plans(cfg: LLMScaleConfig, world_size: int, device_bytes: float) -> List[PlanOption]:
    """Plans of `world_size` ranks that fit `device_bytes`, cheapest first. Every candidate goes
    through `validate`, so the rules a real launch enforces (divisibility, ZeRO-2/3 without
    pipeline, batch arithmetic) decide which exist. Candidates keep the config's
    sequence-parallel setting."""
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
                for recompute in RECOMPUTE_ORDER:
                    memory = estimate(model, plan, cfg.data.seq_len, cfg.train.precision,
                                      recompute, cfg.adapter)
                    if memory.fits(device_bytes):
                        options.append(PlanOption(plan, recompute, memory))
    return sorted(options, key=_cost)
