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


def test_qlora_refuses_what_it_cannot_quantise_or_split():
    # The tiny model's intermediate_size 352 is 5.5 NF4 blocks.
    message = config_error(["adapter=qlora"], 1)
    assert "model.intermediate_size=352 must be a multiple of 64" in message, message
    assert "(gate_proj, up_proj, down_proj)" in message
    validate(load_config(BASE + ["adapter=qlora", "adapter.target_modules=[q_proj,v_proj]"]), 1)
    qlora = ["adapter=qlora", "model.intermediate_size=384"]
    validate(load_config(BASE + qlora), 2)
    validate(load_config(BASE + qlora + ["parallel.tp=2", "parallel.sequence_parallel=true"]), 2)
    assert "adapter.kind=qlora is not supported with pipeline stages (parallel.pp=2): set " \
        "parallel.pp=1" in config_error(qlora + ["parallel.pp=2", "model.tie_embeddings=false"], 2)
    assert "adapter.kind=qlora is supported at parallel.zero_stage 0, 1 or 2" in config_error(
        qlora + ["parallel.zero_stage=3"], 2)
    # 8 heads of 16, 2 for keys and values: k_proj and v_proj are 32 wide.
    assert "model.num_kv_heads * head_dim=32 must be a multiple of 64, or leave the projections " \
        "it sizes (k_proj, v_proj) out" in config_error(qlora + ["model.num_heads=8"], 1)


def test_qlora_without_torchao_names_the_extra(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchao" else find_spec(name, *args))
    assert "pip install 'llmscale[qlora]'" in config_error(
        ["adapter=qlora", "model.intermediate_size=384"], 1)


def test_qlora_under_tensor_parallelism_needs_whole_blocks_in_each_ranks_rows():
    """A row-parallel projection's shard holds part of each row: o_proj's 128 / 4 = 32 and
    down_proj's 384 / 4 = 96 are not whole blocks of 64. Column-parallel shards keep whole rows
    (k_proj and v_proj, 4 heads of 32, split into 32-row shards at tp=4, are accepted)."""
    qlora = ["adapter=qlora", "model.intermediate_size=384", "model.num_kv_heads=4",
             "parallel.tp=4"]
    message = config_error(qlora, 4)
    assert "model.hidden_size=128 split over parallel.tp=4 leaves rows 32 wide on each rank, not " \
        "a multiple of 64; make model.hidden_size a multiple of 256 or lower parallel.tp, or " \
        "leave the projections it splits (o_proj) out of adapter.target_modules" in message
    assert "model.intermediate_size=384 split over parallel.tp=4 leaves rows 96 wide" in message
    assert "(down_proj) out of" in message and "num_kv_heads" not in message, message
    validate(load_config(BASE + qlora + ["model.hidden_size=256", "model.intermediate_size=512"]),
             4)
    validate(load_config(BASE + qlora + ["adapter.target_modules=[q_proj,k_proj,v_proj]"]), 4)
