"""Composing `conf/` with command-line overrides: good overrides land in the typed config, bad ones
raise one `ConfigError` that names the key."""

from typing import List

import pytest

from llmscale.config import ConfigError, LLMScaleConfig, load_config, strip_launcher_args, to_yaml
from llmscale.config.schema import LRDecay, Precision


def test_overrides_land_in_the_typed_config() -> None:
    cfg = load_config(["+exp=tiny", "train.max_steps=5", "optim.decay=linear",
                       "train.precision=bf16", "parallel.dp=2", "data.paths=[a.txt,b/]"])
    assert isinstance(cfg, LLMScaleConfig)
    assert cfg.name == "tiny"
    assert cfg.model.hidden_size == 128 and cfg.model.num_kv_heads == 2
    assert cfg.optim.lr == 3e-3
    assert cfg.train.max_steps == 5
    assert cfg.optim.decay is LRDecay.linear
    assert cfg.train.precision is Precision.bf16
    assert cfg.parallel.dp == 2
    assert cfg.data.paths == ["a.txt", "b/"]
    assert cfg.train.run_dir == "runs/tiny"


def test_defaults_without_an_experiment() -> None:
    cfg = load_config([])
    assert cfg.name == "default"
    assert cfg.model.name == "tiny"
    assert cfg.parallel.zero_stage == 1 and cfg.parallel.deepspeed_extra == {}


def test_deepspeed_extra_takes_new_nested_keys_with_plus() -> None:
    cfg = load_config([
        "+parallel.deepspeed_extra.zero_optimization.reduce_bucket_size=1000",
        "+parallel.deepspeed_extra.flops_profiler={enabled:true,profile_step:3}",
    ])
    assert cfg.parallel.deepspeed_extra == {
        "zero_optimization": {"reduce_bucket_size": 1000},
        "flops_profiler": {"enabled": True, "profile_step": 3},
    }
    assert type(cfg.parallel.deepspeed_extra["zero_optimization"]) is dict


# (overrides, substrings the one-line-per-fact message must contain)
BAD_OVERRIDES = [
    pytest.param(["+exp=nosuch"], ["Could not find 'exp/nosuch'", "Available options in 'exp'",
                                    "tiny", "70b"], id="unknown-experiment"),
    pytest.param(["model=nosuch"], ["Could not find 'model/nosuch'"], id="unknown-model"),
    pytest.param(["exp=tiny"], ["Could not override 'exp'", "use +exp=tiny"],
                 id="experiment-without-plus"),
    pytest.param(["+exp=tiny", "+exp=1b"], ["Multiple values for exp"], id="two-experiments"),
    pytest.param(["train.max_steps=abc"],
                 ["train.max_steps=abc", "Value 'abc' of type 'str' could not be converted to "
                  "Integer", "full_key: train.max_steps"], id="int-field-gets-text"),
    pytest.param(["parallel.tp=1.5"], ["parallel.tp=1.5", "full_key: parallel.tp"],
                 id="int-field-gets-float"),
    pytest.param(["dry_run=maybe"], ["Value 'maybe' is not a valid bool", "full_key: dry_run"],
                 id="bool-field-gets-text"),
    pytest.param(["optim.decay=exponential"],
                 ["Invalid value 'exponential', expected one of [cosine, linear, constant]",
                  "full_key: optim.decay"], id="unknown-decay"),
    pytest.param(["train.precision=fp16"],
                 ["Invalid value 'fp16', expected one of [fp32, bf16]",
                  "full_key: train.precision"], id="unknown-precision"),
    pytest.param(["data.seq_len=null"], ["field 'data.seq_len' is not Optional"],
                 id="null-for-required-field"),
    pytest.param(["data.paths=corpus.txt"], ["str is not a ListConfig", "full_key: data.paths"],
                 id="list-field-gets-string"),
    pytest.param(["parallel.deepspeed_extra=5"],
                 ["Cannot assign int to Dict[str, Any]", "full_key: parallel.deepspeed_extra"],
                 id="dict-field-gets-int"),
    pytest.param(["train.nosuch=1"], ["Key 'nosuch' not in 'TrainConfig'",
                                      "full_key: train.nosuch"], id="unknown-key"),
    pytest.param(["nosuch=1"], ["Key 'nosuch' not in 'LLMScaleConfig'"], id="unknown-top-key"),
    pytest.param(["+train.max_step=5"],
                 ["unknown key train.max_step: TrainConfig has no such setting",
                  "did you mean train.max_steps?"], id="plus-adds-a-typo"),
    pytest.param(["+model.nosuch.deep=1", "+nosuch=2"],
                 ["unknown key model.nosuch: ModelConfig", "unknown key nosuch: LLMScaleConfig"],
                 id="plus-adds-unknown-keys"),
    pytest.param(["parallel.deepspeed_extra.zero_optimization.stage=3"],
                 ["full_key: parallel.deepspeed_extra.zero_optimization",
                  "use +parallel.deepspeed_extra.zero_optimization.stage=3"],
                 id="deepspeed-extra-without-plus"),
    pytest.param(["train.max_steps"], ["Error parsing override 'train.max_steps'"],
                 id="override-without-value"),
    pytest.param(["--max_steps=5"], ["unknown option '--max_steps=5'", "+exp=tiny"],
                 id="dashed-flag"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES)
def test_bad_override_names_the_key(overrides: List[str], expected: List[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    message = str(caught.value)
    for part in expected:
        assert part in message
    # OmegaConf's unfilled templates are dropped.
    assert "$VALUE" not in message and "$KEY" not in message


@pytest.mark.parametrize("override", ["train.nosuch=1", "model.max_seq=1"])
def test_unknown_schema_key_gets_no_plus_hint(override: str) -> None:
    """Hydra suggests `+key=value` for an unknown key, which cannot add a setting to the
    schema."""
    with pytest.raises(ConfigError) as caught:
        load_config([override])
    assert "To append" not in str(caught.value)
    assert "+" + override not in str(caught.value)


def test_strip_launcher_args_drops_only_local_rank() -> None:
    argv = ["--local_rank=3", "+exp=tiny", "--local_rank", "2", "train.max_steps=5",
            "--local-rank=1", "--local-rank", "0", "dry_run=true"]
    assert strip_launcher_args(argv) == ["+exp=tiny", "train.max_steps=5", "dry_run=true"]


def test_to_yaml_holds_the_resolved_settings() -> None:
    text = to_yaml(load_config(["+exp=tiny", "train.max_steps=7", "optim.decay=constant"]))
    assert "name: tiny" in text
    assert "max_steps: 7" in text
    assert "decay: constant" in text
