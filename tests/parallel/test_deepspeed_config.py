"""The DeepSpeed config generated from the llmscale config and its plan."""

import copy
from typing import List

import pytest

from llmscale.config import load_config, validate
from llmscale.parallel.deepspeed_config import build_deepspeed_config

CPU_OFFLOAD = {"device": "cpu", "pin_memory": False}


def generated(overrides: List[str], world_size: int = 1) -> dict:
    cfg = load_config(["+exp=tiny"] + overrides)
    return build_deepspeed_config(cfg, validate(cfg, world_size))


@pytest.mark.parametrize(
    ("overrides", "world_size", "batch", "micro", "accum"),
    [
        ([], 1, 16, 8, 2),
        ([], 2, 16, 8, 1),
        (["train.micro_batch_size=2", "train.global_batch_size=64"], 4, 64, 2, 8),
        (["parallel.tp=2", "train.micro_batch_size=4", "train.global_batch_size=32"], 4, 32, 4, 4),
    ],
)
def test_batch_fields_follow_the_plan(
    overrides: List[str], world_size: int, batch: int, micro: int, accum: int
) -> None:
    cfg = load_config(["+exp=tiny"] + overrides)
    plan = validate(cfg, world_size)
    config = build_deepspeed_config(cfg, plan)
    assert config["train_batch_size"] == plan.global_batch_size == batch
    assert config["train_micro_batch_size_per_gpu"] == plan.micro_batch_size == micro
    assert config["gradient_accumulation_steps"] == plan.grad_accum_steps == accum
    # DeepSpeed's own identity, over the data-parallel ranks only.
    assert batch == micro * accum * plan.dp


@pytest.mark.parametrize(
    ("overrides", "zero"),
    [
        (["parallel.zero_stage=0"], {"stage": 0}),
        (["parallel.zero_stage=1"], {"stage": 1}),
        (["parallel.zero_stage=2"], {"stage": 2}),
        (["parallel.zero_stage=3"], {"stage": 3}),
        (["parallel.zero_stage=1", "parallel.offload_optimizer=true"],
         {"stage": 1, "offload_optimizer": CPU_OFFLOAD}),
        (["parallel.zero_stage=3", "parallel.offload_params=true"],
         {"stage": 3, "offload_param": CPU_OFFLOAD}),
        (["parallel.zero_stage=3", "parallel.offload_optimizer=true",
          "parallel.offload_params=true"],
         {"stage": 3, "offload_optimizer": CPU_OFFLOAD, "offload_param": CPU_OFFLOAD}),
    ],
)
def test_zero_stage_and_offload(overrides: List[str], zero: dict) -> None:
    assert generated(overrides)["zero_optimization"] == zero


@pytest.mark.parametrize(("precision", "enabled"), [("fp32", False), ("bf16", True)])
def test_bf16_flag_follows_precision(precision: str, enabled: bool) -> None:
    assert generated([f"train.precision={precision}"])["bf16"] == {"enabled": enabled}


def test_bf16_without_zero_is_autocast_over_fp32_weights() -> None:
    config = generated(["train.precision=bf16", "parallel.zero_stage=0"])
    assert config["bf16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in generated(["train.precision=fp32", "parallel.zero_stage=0"])
    assert "torch_autocast" not in generated(["train.precision=bf16", "parallel.zero_stage=1"])


def test_clipping_and_quiet_logging() -> None:
    config = generated(["optim.clip_grad=0.25"])
    assert config["gradient_clipping"] == 0.25
    assert config["steps_per_print"] >= 1 << 30
    assert config["wall_clock_breakdown"] is False
    # A torch optimizer object is passed in, so the JSON names none (no FusedAdam build).
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True


def test_deepspeed_extra_deep_merges_over_the_generated_config() -> None:
    cfg = load_config([
        "+exp=tiny",
        "parallel.zero_stage=2",
        "parallel.offload_optimizer=true",
        "+parallel.deepspeed_extra.zero_optimization.reduce_bucket_size=1000",
        "+parallel.deepspeed_extra.zero_optimization.offload_optimizer.pin_memory=true",
        "+parallel.deepspeed_extra.bf16.enabled=true",
        "+parallel.deepspeed_extra.gradient_clipping=0.5",
        "+parallel.deepspeed_extra.flops_profiler={enabled:true,profile_step:3}",
    ])
    extra_before = copy.deepcopy(cfg.parallel.deepspeed_extra)
    plan = validate(cfg, 1)
    config = build_deepspeed_config(cfg, plan)

    assert config["zero_optimization"] == {
        "stage": 2,  # kept
        "offload_optimizer": {"device": "cpu", "pin_memory": True},  # nested key overridden
        "reduce_bucket_size": 1000,  # added
    }
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 0.5
    assert config["flops_profiler"] == {"enabled": True, "profile_step": 3}
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 2
    # The merge copies: neither the settings nor a second generation are affected.
    assert cfg.parallel.deepspeed_extra == extra_before
    assert build_deepspeed_config(cfg, plan) == config


def test_extra_value_of_another_shape_replaces_the_generated_one() -> None:
    config = generated(["+parallel.deepspeed_extra.bf16=false"])
    assert config["bf16"] is False


def test_deepspeed_accepts_the_generated_config() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    # Without a process group DeepSpeed checks the batch identity for a world of one rank.
    config = generated(["train.precision=bf16", "parallel.zero_stage=3",
                        "parallel.offload_optimizer=true", "parallel.offload_params=true",
                        "+parallel.deepspeed_extra.zero_optimization.reduce_bucket_size=1000"])
    parsed = DeepSpeedConfig(config)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
            parsed.gradient_accumulation_steps) == (16, 8, 2)
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.offload_param.device == "cpu"
    assert parsed.zero_config.reduce_bucket_size == 1000
    assert parsed.bfloat16_config.enabled
