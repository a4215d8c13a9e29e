"""Memory per device of a plan (llmscale/parallel/memory_plan.py) and tools/plan.py, against
numbers worked out by hand for a small model."""

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llmscale.config import load_config, validate
from llmscale.config.schema import ModelConfig, Precision
from llmscale.config.validate import ParallelPlan
from llmscale.models import count_parameters
from llmscale.parallel.memory_plan import (
    GiB,
    Recompute,
    estimate,
    fitting_plans,
    layer_activation_bytes,
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
SBH = SEQ * MICRO * 64  # 4,096
# Korthikanti et al. without recompute: 34 + 5*a*s/h = 34 + 5*4*32/64 = 44 bytes per s*b*h.
LAYER_BYTES = 44 * SBH
OUTPUT_LAYER_BYTES = 4 * SBH * (1 + 256 / 64)


def plan(dp: int = 4, tp: int = 1, pp: int = 1, zero: int = 0) -> ParallelPlan:
    return ParallelPlan(world_size=dp * tp * pp, dp=dp, tp=tp, pp=pp, zero_stage=zero,
                        micro_batch_size=MICRO, grad_accum_steps=1,
                        global_batch_size=MICRO * dp)


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
    memory = estimate(MODEL, plan(dp=4, zero=zero), SEQ, Precision.bf16, Recompute.none)
    assert memory.parameters == weights * PARAMETERS
    assert memory.gradients == grads * PARAMETERS
    assert memory.optimizer == optimizer * PARAMETERS
    assert memory.activations == 4 * LAYER_BYTES + OUTPUT_LAYER_BYTES
    assert memory.total == (weights + grads + optimizer) * PARAMETERS + memory.activations


def test_fp32_training_keeps_two_moments_and_wider_activations() -> None:
    memory = estimate(MODEL, plan(dp=1), SEQ, Precision.fp32, Recompute.none)
    assert (memory.parameters, memory.gradients, memory.optimizer) == (
        4 * PARAMETERS, 4 * PARAMETERS, 8 * PARAMETERS)
    assert memory.activations == 2 * (4 * LAYER_BYTES + OUTPUT_LAYER_BYTES)


def test_activations_per_layer_by_recompute_and_tp() -> None:
    assert layer_activation_bytes(MODEL, SEQ, MICRO, 1, Recompute.none) == LAYER_BYTES
    assert layer_activation_bytes(MODEL, SEQ, MICRO, 1, Recompute.selective) == 34 * SBH
    assert layer_activation_bytes(MODEL, SEQ, MICRO, 1, Recompute.full) == 2 * SBH
    assert layer_activation_bytes(MODEL, SEQ, MICRO, 2, Recompute.none) == LAYER_BYTES / 2


def test_first_pipeline_stage_holds_pp_micro_batches() -> None:
    # pp=2: stage 0 keeps 2 layers x 2 micro-batches, the last 2 x 1 plus the output layer;
    # stage 0 also has 64 fewer parameters (no final norm) but more in all here.
    memory = estimate(MODEL, plan(dp=1, pp=2), SEQ, Precision.bf16, Recompute.none)
    assert memory.stage == 0
    assert memory.activations == 2 * 2 * LAYER_BYTES
    assert memory.parameters == 2 * (2 * (36_864 + 128) + 16_384)


def test_more_data_parallel_ranks_under_zero3_need_less_each() -> None:
    totals = [estimate(MODEL, plan(dp=dp, zero=3), SEQ, Precision.bf16, Recompute.none).total
              for dp in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_recompute_lowers_activation_memory() -> None:
    activations = [estimate(MODEL, plan(), SEQ, Precision.bf16, recompute).activations
                   for recompute in (Recompute.none, Recompute.selective, Recompute.full)]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 3


def test_70b_on_512_devices_of_80_gib() -> None:
    cfg = load_config(["+exp=70b"])
    device = 80 * GiB
    flat = replace(cfg, parallel=replace(cfg.parallel, tp=1, pp=1, zero_stage=0))
    memory = estimate(cfg.model, validate(flat, 512), cfg.data.seq_len, cfg.train.precision,
                      Recompute.full)
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
