"""The `adapter` settings: bad values and plans LoRA does not support are named with the fix."""

from llmscale.config import load_config, validate
from test_validate import BASE, config_error


def test_the_lora_group_composes_and_validates():
    cfg = load_config(BASE + ["adapter=lora"])
    validate(cfg, 2)
    assert cfg.adapter.kind.value == "lora" and cfg.adapter.rank == 8
    assert "down_proj" in cfg.adapter.target_modules


def test_every_bad_adapter_value_is_named_in_one_error():
    message = config_error(["adapter=lora", "adapter.rank=0", "adapter.alpha=-1",
                            "adapter.dropout=1.0", "adapter.target_modules=[q_proj,qkv]"], 1)
    for named in ("adapter.rank=0", "adapter.alpha=-1.0", "adapter.dropout=1.0",
                  "unknown: ['qkv']"):
        assert named in message, message


def test_lora_composes_with_tensor_and_pipeline_parallelism():
    validate(load_config(BASE + ["adapter=lora", "parallel.tp=2",
                                 "parallel.sequence_parallel=true"]), 2)
    validate(load_config(BASE + ["adapter=lora", "parallel.pp=2", "model.tie_embeddings=false"]),
             2)


def test_plans_lora_does_not_support_yet_are_refused():
    assert "parallel.zero_stage 0, 1 or 2" in config_error(
        ["adapter=lora", "parallel.zero_stage=3"], 2)
    assert "model.num_experts=4" in config_error(
        ["adapter=lora", "model=moe_tiny", "parallel.zero_stage=1"], 2)


def test_adapter_settings_are_ignored_without_an_adapter():
    validate(load_config(BASE + ["adapter.rank=0", "parallel.tp=2"]), 2)
