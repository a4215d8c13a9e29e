"""Memory per device of a plan (llmscale/parallel/memory_plan.py) and tools/plan.py, against
numbers worked out by hand for a small model."""

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llmscale.config import load_config, validate
from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import ActivationCheckpointing, ModelConfig, Precision
from llmscale.models import count_parameters
from llmscale.parallel.memory_plan import (
    GiB,
    estimate,
    fitting_plans,
    layer_activation_bytes,
    layer_backward_bytes,
    output_backward_bytes,
    stage_parameters,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "tools" / "plan.py"

# Per layer: attention 2*64*64 (q, o) + 2*64*32 (k, v) = 12,288, MLP 3*64*128 = 24,576, so
# 36,864 in matrices and 128 in the two norms; embedding and lm_head 256*64 = 16,384 each.
MODEL = ModelConfig(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, vocab_size=256)
PARAMETERS = 4 * (36_864 + 128) + 64 + 2 * 16_384  # 180,800
SEQ, MICRO = 32, 2
TOKENS = SEQ * MICRO  # 64
NONE, SELECTIVE, FULL = (ActivationCheckpointing.none, ActivationCheckpointing.selective,
                         ActivationCheckpointing.full)
# Bytes per token autograd saves in one layer in bf16 (memory_plan's docstring; kv = 2 heads x 16):
# norms 2 x (fp32 input 4*64 + 1/rms 4 + normalised 2*64) = 776, the q/k/v and gate/up inputs
# 2 x 2*64 = 256 (those two the sequence-parallel region, 1,032), attention q, k, v 2*(64 + 2*32)
# + output 2*64 + logsumexp 4*4 = 400, SwiGLU 4 x 2*128 = 1,024 (tensor-parallel region, 1,424).
# (Korthikanti et al.'s GPT-3 formula, used before, gave 34 + 5*a*s/h = 44 bytes per s*b*h.)
SEQUENCE_REGION, TENSOR_REGION = 1_032, 1_424
LAYER_BYTES = (SEQUENCE_REGION + TENSOR_REGION) * TOKENS  # 157,184
# selective keeps the input, the matmul outputs and attention's: 2*(5*64 + 2*32 + 2*128) + 16;
# full the input only.
SELECTIVE_BYTES, FULL_BYTES = 1_296 * TOKENS, 2 * 64 * TOKENS
# Final norm 6*64 + 4, lm_head input 2*64, the loss's fp32 log-probabilities 4*256.
OUTPUT_LAYER_BYTES = (6 * 64 + 4 + 2 * 64 + 4 * 256) * TOKENS
ACTIVATIONS = 4 * LAYER_BYTES + OUTPUT_LAYER_BYTES  # 727,296
LOSS_BACKWARD_BYTES = 2 * 4 * 256 * TOKENS  # the fp32 gradients of log-probs and logits
LAYER_BACKWARD_BYTES = (2 * 64 + 2 * 2 * 128) * TOKENS  # of the output, SiLU(gate) and up


def plan(dp: int = 4, tp: int = 1, pp: int = 1, zero: int = 0, accum: int = 1,
         sequence_parallel: bool = True) -> ParallelPlan:
    accum = max(accum, pp)  # a pipeline needs micro-batches (validate enforces it)
    return ParallelPlan(world_size=dp * tp * pp, dp=dp, tp=tp, pp=pp, zero_stage=zero,
                        micro_batch_size=MICRO, grad_accum_steps=accum,
                        global_batch_size=MICRO * accum * dp,
                        sequence_parallel=sequence_parallel and tp > 1)


def test_whole_model_on_one_stage_is_the_parameter_count() -> None:
    assert count_parameters(MODEL) == PARAMETERS == stage_parameters(MODEL, 1, 1, 0)


def test_pipeline_stages_split_layers_and_ends() -> None:
    # tp=2 halves every matrix and the vocabulary, not the norms: 2 layers x (18,432 + 128).
    assert stage_parameters(MODEL, tp=2, pp=2, stage=0) == 37_120 + 8_192
    assert stage_parameters(MODEL, tp=2, pp=2, stage=1) == 37_120 + 64 + 8_192
    untied = sum(stage_parameters(MODEL, 1, 4, stage) for stage in range(4))
    assert untied == PARAMETERS
    # A tied lm_head is one weight with pp=1, but a copy on the last stage with pp>1.
    tied = replace(MODEL, tie_embeddings=True)
    assert stage_parameters(tied, 1, 1, 0) == count_parameters(tied) == PARAMETERS - 16_384
    assert sum(stage_parameters(tied, 1, 4, stage) for stage in range(4)) == PARAMETERS


@pytest.mark.parametrize(
    ("zero", "weights", "grads", "optimizer"),
    [(0, 2, 2, 12), (1, 2, 2, 3), (2, 2, 0.5, 3), (3, 0.5, 0.5, 3)],
)
def test_zero_stages_shard_model_states_over_dp(zero, weights, grads, optimizer) -> None:
    memory = estimate(MODEL, plan(dp=4, zero=zero), SEQ, Precision.bf16, NONE)
    assert memory.parameters == weights * PARAMETERS
    assert memory.gradients == grads * PARAMETERS
    assert memory.optimizer == optimizer * PARAMETERS
    assert memory.activations == ACTIVATIONS
    # One micro-batch a step: the backward pass starts with no gradients, and AdamW's 4-byte
    # temporary per parameter (sharded from ZeRO-1 on) comes when the activations are gone.
    adamw_temporary = 4 * PARAMETERS / (4 if zero >= 1 else 1)
    moments = {
        "backward start": ACTIVATIONS + LOSS_BACKWARD_BYTES,
        "backward end": LAYER_BYTES + LAYER_BACKWARD_BYTES + grads * PARAMETERS,
        "optimizer step": grads * PARAMETERS + adamw_temporary,
    }
    assert memory.moment == max(moments, key=moments.get)
    assert memory.total == (weights + optimizer) * PARAMETERS + max(moments.values())
    assert memory.temporaries == max(LOSS_BACKWARD_BYTES, adamw_temporary)


def test_accumulated_gradients_are_there_when_the_backward_starts() -> None:
    memory = estimate(MODEL, plan(dp=4, zero=2, accum=2), SEQ, Precision.bf16, NONE)
    assert memory.moment == "backward start"
    assert memory.total == (2 + 0.5 + 3) * PARAMETERS + ACTIVATIONS + LOSS_BACKWARD_BYTES


def test_fp32_training_keeps_two_moments_and_wider_activations() -> None:
    memory = estimate(MODEL, plan(dp=1), SEQ, Precision.fp32, NONE)
    assert (memory.parameters, memory.gradients, memory.optimizer) == (
        4 * PARAMETERS, 4 * PARAMETERS, 8 * PARAMETERS)
    # Each norm's fp32 input is the input itself; every other tensor doubles: 32h + 8kv + 16i +
    # 4a + 8 a token, and 8h + 4 + 4h + 4V in the output layer.
    layer = (32 * 64 + 8 * 32 + 16 * 128 + 4 * 4 + 8) * TOKENS
    output_layer = (8 * 64 + 4 + 4 * 64 + 4 * 256) * TOKENS
    assert memory.activations == 4 * layer + output_layer


def test_activations_per_layer_by_recompute_and_tp() -> None:
    args = (MODEL, SEQ, MICRO)
    assert layer_activation_bytes(*args, 1, NONE, Precision.bf16) == LAYER_BYTES
    assert layer_activation_bytes(*args, 1, SELECTIVE, Precision.bf16) == SELECTIVE_BYTES
    assert layer_activation_bytes(*args, 1, FULL, Precision.bf16) == FULL_BYTES
    assert layer_activation_bytes(*args, 2, NONE, Precision.bf16) == LAYER_BYTES / 2
    # Without sequence parallelism the norms and the projections' inputs are whole on every
    # tensor-parallel rank.
    assert layer_activation_bytes(*args, 2, NONE, Precision.bf16, sequence_parallel=False) == (
        SEQUENCE_REGION + TENSOR_REGION / 2) * TOKENS
    # selective at tp 2: the layer input 2*64 / 2, the column-parallel outputs and attention's
    # (2*(64 + 2*32 + 2*128) + 2*64 + 16) / 2 = 456, and o_proj's and down_proj's outputs whole
    # on every rank (partial sums before the reduction), 2 x 2*64.
    assert layer_activation_bytes(*args, 2, SELECTIVE, Precision.bf16) == (
        64 + 456 + 256) * TOKENS


def test_layer_backward_by_tp() -> None:
    args = (MODEL, SEQ, MICRO)
    assert layer_backward_bytes(*args, 1, NONE, Precision.bf16) == LAYER_BACKWARD_BYTES
    # tp 2: the layer output's gradient 2*64 / 2 and SwiGLU's 2 x 2*128 / 2; the post-attention
    # norm's backward, five fp32 temporaries 20*64 less its two outputs 2 x 2*64 (/ 2) and less
    # SwiGLU's four i-wide tensors 4 x 2*128 / 2, is 0.
    assert layer_backward_bytes(*args, 2, NONE, Precision.bf16) == (64 + 256) * TOKENS
    # Without sequence parallelism the norm's temporaries are whole: 1,024 - 512 beats 256.
    assert layer_backward_bytes(*args, 2, NONE, Precision.bf16, sequence_parallel=False) == (
        128 + 512) * TOKENS


def test_vocabulary_parallel_loss_backward() -> None:
    args = (MODEL, SEQ, MICRO)
    assert output_backward_bytes(*args, 1, Precision.bf16) == LOSS_BACKWARD_BYTES
    # Megatron's loss writes the gradient over its fp32 softmax: in fp32 nothing is new until
    # lm_head's backward, its input's gradient 4*64 (whole without sequence parallelism) and its
    # weight's; the final norm's backward, 20*64 - 2 x 4*64 less the softmax 4*128, ties.
    assert output_backward_bytes(*args, 2, Precision.fp32, False, 1_000) == (
        4 * 64 * TOKENS + 1_000)
    # In bf16 the cast's backward copies the gradient, 2*128. lm_head's backward holds that
    # copy, the fp32 gradient freed, and its input's gradient, with sequence parallelism whole
    # and reduce-scattered, 2*64 * (1 + 1/2): fuller only with a large weight gradient.
    assert output_backward_bytes(*args, 2, Precision.bf16, True) == 2 * 128 * TOKENS
    assert output_backward_bytes(*args, 2, Precision.bf16, True, 30_000) == (
        (2 * 128 - 4 * 128 + 192) * TOKENS + 30_000)


def test_sequence_parallelism_keeps_an_all_gather_buffer() -> None:
    memory = estimate(MODEL, plan(dp=1, tp=2), SEQ, Precision.bf16, NONE)
    assert memory.buffers == TOKENS * 64 * 2  # one [s, b, h] in bf16
    # tp 2: 4 x (36,864 / 2 + 128) + 2 x 16,384 / 2 + 64 parameters; with one micro-batch the
    # optimizer step (gradients and AdamW's temporary, 2 + 4 bytes each) is the fullest moment.
    params = 4 * (18_432 + 128) + 16_384 + 64
    assert memory.moment == "optimizer step"
    assert memory.total == (2 + 12) * params + memory.buffers + (2 + 4) * params
    without = estimate(MODEL, plan(dp=1, tp=2, sequence_parallel=False), SEQ, Precision.bf16,
                       NONE)
    assert without.buffers == 0


def test_first_pipeline_stage_holds_pp_micro_batches() -> None:
    # pp=2: stage 0 keeps 2 layers x 2 micro-batches, the last 2 x 1 plus the output layer;
    # stage 0 also has 64 fewer parameters (no final norm) but more in all here.
    memory = estimate(MODEL, plan(dp=1, pp=2), SEQ, Precision.bf16, NONE)
    assert memory.stage == 0
    assert memory.activations == 2 * 2 * LAYER_BYTES
    assert memory.parameters == 2 * (2 * (36_864 + 128) + 16_384)


def test_more_data_parallel_ranks_under_zero3_need_less_each() -> None:
    totals = [estimate(MODEL, plan(dp=dp, zero=3), SEQ, Precision.bf16, NONE).total
              for dp in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_recompute_lowers_activation_memory() -> None:
    activations = [estimate(MODEL, plan(), SEQ, Precision.bf16, recompute).activations
                   for recompute in (NONE, SELECTIVE, FULL)]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 3


def test_70b_on_512_devices_of_80_gib() -> None:
    cfg = load_config(["+exp=70b"])
    device = 80 * GiB
    flat = replace(cfg, parallel=replace(cfg.parallel, tp=1, pp=1, zero_stage=0))
    memory = estimate(cfg.model, validate(flat, 512), cfg.data.seq_len, cfg.train.precision,
                      FULL)
    assert not memory.fits(device)  # 16 bytes x 69B parameters on every device
    options = fitting_plans(cfg, 512, device)
    assert options
    for option in options:
        assert option.estimate.fits(device)
        assert option.plan.dp * option.plan.tp * option.plan.pp == 512
        assert option.plan.zero_stage <= 1 or option.plan.pp == 1
    sizes = [option.plan.tp * option.plan.pp for option in options]
    assert sizes == sorted(sizes)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_plan_and_fitting_plans() -> None:
    result = run_tool("+exp=70b", "--world-size", "512", "--gpu-memory", "80",
                      "--activation-checkpointing", "selective")
    assert result.returncode == 0, result.stderr
    assert "world 512 = dp 16 x tp 8 x pp 4" in result.stdout
    assert "activation checkpointing selective" in result.stdout
    assert "fits in 72.0 of 80 GiB" in result.stdout
    assert "recompute" in result.stdout.split("plans of 512 ranks")[1]
    bad = run_tool("+exp=70b", "--world-size", "100")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("plan: error: invalid configuration")


def load_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["+exp=70b", "--world-size", "100"], "world size 100 is not divisible"),
        (["+exp=tiny", "--world-size", "0"], "--world-size=0 must be at least 1"),
        (["+exp=tiny", "--world-size", "1", "--gpu-memory", "-1"], "--gpu-memory=-1.0"),
        (["+exp=tiny", "--world-size", "1", "--activation-checkpointing", "some"],
         "invalid choice: 'some'"),
        (["+exp=tiny", "train.nosuch=1", "--world-size", "1"], "train.nosuch"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(argv, message, capsys) -> None:
    tool = load_tool()
    try:
        code = tool.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
