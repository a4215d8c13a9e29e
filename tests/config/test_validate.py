"""Every cross-field rule of `validate`: each bad value must be named with its field, its value
and the fix, and every failing rule must be reported in the same error."""

import sys
from pathlib import Path
from typing import List

import pytest

from llmscale.config import ConfigError, ParallelPlan, load_config, validate

# The tiny experiment: hidden 128, 4 heads, 2 KV heads, intermediate 352, 2 layers,
# max_seq_len 256, seq_len 128, micro batch 8, global batch 16, ZeRO-1, lr 3e-3, min_lr 3e-4.
BASE = ["+exp=tiny"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def config_error(overrides: List[str], world_size: int) -> str:
    cfg = load_config(BASE + overrides)
    with pytest.raises(ConfigError) as caught:
        validate(cfg, world_size)
    return str(caught.value)


POSITIVE_FIELDS = [
    "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.intermediate_size", "model.vocab_size", "model.max_seq_len", "model.vocab_multiple",
    "model.moe_top_k",
    "parallel.tp", "parallel.pp", "parallel.dp", "parallel.ep", "parallel.pp_microbatches",
    "train.max_steps", "train.exit_at_step", "train.micro_batch_size", "train.global_batch_size",
    "train.grad_accum_steps", "train.eval_interval", "train.eval_batches", "train.log_interval",
    "data.seq_len",
]


def test_every_non_positive_size_is_named_in_one_error() -> None:
    message = config_error([f"{field}=0" for field in POSITIVE_FIELDS] + ["optim.lr=-1e-3"], 1)
    assert message.splitlines() == (
        ["invalid configuration:"]
        + [f"  - {field}=0 must be positive" for field in POSITIVE_FIELDS]
        + ["  - optim.lr=-0.001 must be positive"]
    )


# (overrides on top of the tiny experiment, world size, substrings the message must contain)
CASES = [
    pytest.param(
        ["checkpoint.interval=-1"], 1,
        ["checkpoint.interval=-1 must be >= 0 (0: no periodic saves)"],
        id="checkpoint-interval-negative",
    ),
    pytest.param(
        ["model.hidden_size=130"], 1,
        ["model.hidden_size=130 is not divisible by model.num_heads=4",
         "pick num_heads from [1, 2, 5, 10, 13, 26, 65, 130]"],
        id="hidden-not-divisible-by-heads",
    ),
    pytest.param(
        ["model.num_kv_heads=3"], 1,
        ["model.num_heads=4 is not divisible by model.num_kv_heads=3",
         "pick num_kv_heads from [1, 2, 4]"],
        id="heads-not-divisible-by-kv-heads",
    ),
    pytest.param(
        ["parallel.tp=8"], 8,
        ["parallel.tp=8 does not divide model.num_heads=4",
         "use parallel.tp in [1, 2, 4] or change model.num_heads",
         "parallel.tp=8 does not divide model.num_kv_heads=2",
         "use parallel.tp in [1, 2] or change model.num_kv_heads"],
        id="tp-divides-neither-heads-nor-kv-heads",
    ),
    pytest.param(
        ["model.num_kv_heads=4", "model.intermediate_size=354", "parallel.tp=4"], 4,
        ["parallel.tp=4 does not divide model.intermediate_size=354",
         "use parallel.tp in [1, 2, 3, 6, 59, 118, 177, 354] or change model.intermediate_size"],
        id="tp-does-not-divide-intermediate",
    ),
    pytest.param(
        ["parallel.pp=3"], 3,
        ["parallel.pp=3 does not divide model.num_layers=2",
         "use parallel.pp in [1, 2] or change model.num_layers"],
        id="pp-does-not-divide-layers",
    ),
    pytest.param(
        ["data.seq_len=512"], 1,
        ["data.seq_len=512 exceeds model.max_seq_len=256",
         "lower data.seq_len or raise model.max_seq_len"],
        id="seq-len-over-max",
    ),
    pytest.param(
        ["data.val_fraction=0"], 1,
        ["data.val_fraction=0.0 must lie strictly between 0 and 1"],
        id="val-fraction-zero",
    ),
    pytest.param(
        ["data.val_fraction=1.5"], 1,
        ["data.val_fraction=1.5 must lie strictly between 0 and 1"],
        id="val-fraction-over-one",
    ),
    pytest.param(
        ["optim.min_lr=0.01"], 1,
        ["optim.min_lr=0.01 exceeds optim.lr=0.003: lower optim.min_lr"],
        id="min-lr-over-lr",
    ),
    pytest.param(
        ["optim.warmup_steps=-5"], 1,
        ["optim.warmup_steps=-5 must not be negative"],
        id="warmup-negative",
    ),
    pytest.param(
        ["optim.clip_grad=-0.5"], 1,
        ["optim.clip_grad=-0.5 must not be negative (0 turns clipping off)"],
        id="clip-grad-negative",
    ),
    pytest.param(
        ["parallel.tp=2"], 3,
        ["world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1 = 2",
         "launch a multiple of 2 ranks or lower parallel.tp / parallel.pp"],
        id="world-not-divisible-by-tp-pp",
    ),
    pytest.param(
        ["parallel.dp=2"], 4,
        ["parallel.dp=2 x parallel.tp=1 x parallel.pp=1 = 2 but the job has 4 ranks",
         "set parallel.dp=4 or leave it null to derive it"],
        id="dp-tp-pp-not-world",
    ),
    pytest.param(
        ["parallel.zero_stage=4"], 1,
        ["parallel.zero_stage=4 must be 0, 1, 2 or 3"],
        id="zero-stage-too-high",
    ),
    pytest.param(
        ["parallel.zero_stage=-1"], 1,
        ["parallel.zero_stage=-1 must be 0, 1, 2 or 3"],
        id="zero-stage-negative",
    ),
    pytest.param(
        ["parallel.zero_stage=2", "parallel.pp=2"], 2,
        ["parallel.zero_stage=2 cannot shard gradients across pipeline stages (parallel.pp=2)",
         "use parallel.zero_stage=1 with pipeline parallelism"],
        id="zero2-with-pipeline",
    ),
    pytest.param(
        ["parallel.zero_stage=0", "parallel.offload_optimizer=true"], 1,
        ["parallel.offload_optimizer=true needs parallel.zero_stage >= 1"],
        id="offload-optimizer-without-zero",
    ),
    pytest.param(
        ["parallel.zero_stage=2", "parallel.offload_params=true"], 1,
        ["parallel.offload_params=true needs parallel.zero_stage=3"],
        id="offload-params-without-zero3",
    ),
    pytest.param(
        ["train.global_batch_size=20"], 2,
        ["train.global_batch_size=20 is not divisible by train.micro_batch_size x dp = "
         "8 x 2 = 16", "set train.global_batch_size to a multiple of 16"],
        id="global-batch-not-divisible-derived-accum",
    ),
    pytest.param(
        ["train.grad_accum_steps=3"], 1,
        ["train.global_batch_size=16 != train.micro_batch_size x train.grad_accum_steps x dp = "
         "8 x 3 x 1 = 24", "set train.grad_accum_steps=null to derive it (2)"],
        id="global-batch-mismatch-explicit-accum",
    ),
    pytest.param(
        ["train.grad_accum_steps=2", "parallel.dp=2"], 2,
        ["train.global_batch_size=16 != train.micro_batch_size x train.grad_accum_steps x dp = "
         "8 x 2 x 2 = 32", "set train.grad_accum_steps=null to derive it (1)"],
        id="global-batch-mismatch-explicit-accum-and-dp",
    ),
    pytest.param(
        ["train.grad_accum_steps=2", "train.global_batch_size=24"], 2,
        ["train.global_batch_size=24 != train.micro_batch_size x train.grad_accum_steps x dp = "
         "8 x 2 x 2 = 32: set train.grad_accum_steps=null to derive it, or make the product "
         "match"],
        id="global-batch-mismatch-no-derivable-accum",
    ),
    pytest.param(
        ["model.num_heads=12", "model.num_kv_heads=null", "model.hidden_size=768",
         "parallel.tp=8"], 8,
        ["parallel.tp=8 does not divide model.num_heads=12", "use parallel.tp in [1, 2, 3, 4, 6,"],
        id="twelve-heads-over-tp8",
    ),
    pytest.param(
        ["parallel.tp=2", "model.vocab_size=321"], 2,
        ["parallel.tp=2 does not divide model.vocab_size=321", "set model.vocab_size=null"],
        id="vocab-not-divisible-by-tp",
    ),
    pytest.param(
        ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=127"], 2,
        ["parallel.sequence_parallel=true splits data.seq_len=127 over parallel.tp=2 ranks"],
        id="sequence-parallel-uneven-sequence",
    ),
    pytest.param(
        ["parallel.pp=2"], 2,
        ["model.tie_embeddings=true shares the embedding with the output layer",
         "set parallel.pp=1, or model.tie_embeddings=false"],
        id="tied-embeddings-across-pipeline-stages",
    ),
    pytest.param(
        ["parallel.pp=2", "model.tie_embeddings=false", "parallel.zero_stage=0"], 2,
        ["parallel.zero_stage=0 with parallel.pp=2 would clip gradients by the wrong norm",
         "use parallel.zero_stage=1, or optim.clip_grad=0"],
        id="pipeline-at-zero0-with-clipping",
    ),
    pytest.param(
        ["parallel.pp=2", "model.tie_embeddings=false", "parallel.pp_microbatches=4",
         "train.grad_accum_steps=2"], 2,
        ["parallel.pp_microbatches=4 and train.grad_accum_steps=2 disagree"],
        id="pipeline-microbatches-disagree-with-accumulation",
    ),
    pytest.param(
        ["parallel.ep=2"], 2,
        ["parallel.ep=2 splits experts, but the model is dense (model.num_experts=0)"],
        id="expert-parallel-on-a-dense-model",
    ),
    pytest.param(
        ["model=moe_tiny", "parallel.ep=3"], 3,
        ["parallel.ep=3 does not divide model.num_experts=4: use parallel.ep in [1, 2, 4]"],
        id="experts-not-divisible-by-ep",
    ),
    pytest.param(
        ["model=moe_tiny", "parallel.ep=2", "parallel.dp=1", "parallel.tp=2"], 2,
        ["parallel.ep=2 does not divide the data-parallel size 1",
         "trains with data and expert parallelism only in this build"],
        id="experts-with-tensor-parallel",
    ),
    pytest.param(
        ["model=moe_tiny", "parallel.zero_stage=3"], 1,
        ["parallel.zero_stage=3 is not supported by DeepSpeed's MoE layers"],
        id="moe-at-zero3",
    ),
    pytest.param(
        ["data.paths=[]", "data.chat=prepared/sft", "data.pack=true"], 1,
        ["data.pack=true puts several chat examples in one sample",
         "set data.document_attention=true, or data.pack=false"],
        id="packed-chat-without-document-attention",
    ),
    pytest.param(
        ["data.pack=true", "data.document_attention=true"], 1,
        ["data.pack=true applies to chat data (data.chat)"],
        id="pack-without-chat",
    ),
    pytest.param(
        ["data.paths=[]", "data.chat=prepared/sft", "+data.blend=[{path: prepared/a}]"], 1,
        ["data.chat=prepared/sft and data.blend (1 datasets) are both set"],
        id="chat-and-blend",
    ),
    pytest.param(
        ["data.chat=prepared/sft"], 1,
        ["data.chat=prepared/sft and data.paths=['data/shakespeare'] are both set",
         "data=chat sets data.paths=[]"],
        id="chat-and-text",
    ),
    pytest.param(
        ["data.paths=[]", "data.chat=prepared/sft", "objective=mlm", "model.causal=false"], 1,
        ["data.chat trains the next-token objective, not objective=mlm"],
        id="chat-with-mlm",
    ),
    pytest.param(
        ["model=moe_tiny", "model.moe_top_k=5"], 1,
        ["model.moe_top_k=5 exceeds model.num_experts=4"],
        id="top-k-beyond-experts",
    ),
]


@pytest.mark.parametrize(("overrides", "world_size", "expected"), CASES)
def test_bad_value_is_named_with_its_fix(
    overrides: List[str], world_size: int, expected: List[str]
) -> None:
    message = config_error(overrides, world_size)
    assert message.startswith("invalid configuration:\n  - ")
    for part in expected:
        assert part in message


def test_unset_kv_heads_is_not_blamed_for_tp() -> None:
    """With num_kv_heads unset (MHA) the tp rule names num_heads once, not a setting the user
    never wrote."""
    message = config_error(["model.num_kv_heads=null", "parallel.tp=8"], world_size=8)
    assert "parallel.tp=8 does not divide model.num_heads=4" in message
    assert "model.num_kv_heads" not in message


def test_every_failing_rule_is_reported_in_one_error() -> None:
    message = config_error(
        ["data.seq_len=512", "optim.min_lr=0.01", "parallel.zero_stage=5", "parallel.pp=3",
         "model.tie_embeddings=false"],
        world_size=2,
    )
    problems = message.splitlines()[1:]
    assert len(problems) == 5, message
    for part in (
        "data.seq_len=512 exceeds model.max_seq_len=256",
        "optim.min_lr=0.01 exceeds optim.lr=0.003",
        "parallel.zero_stage=5 must be 0, 1, 2 or 3",
        "parallel.pp=3 does not divide model.num_layers=2",
        "world size 2 is not divisible by parallel.tp x parallel.pp = 1 x 3 = 3",
    ):
        assert sum(part in problem for problem in problems) == 1, part


def test_non_positive_values_are_reported_together_before_cross_field_rules() -> None:
    """The cross-field rules divide by these sizes, so they are only checked once all are
    positive."""
    message = config_error(["model.num_heads=0", "train.max_steps=-3", "data.seq_len=512"], 1)
    assert message.splitlines()[1:] == [
        "  - model.num_heads=0 must be positive",
        "  - train.max_steps=-3 must be positive",
    ]


@pytest.mark.parametrize(
    ("overrides", "world_size", "plan"),
    [
        pytest.param(
            [], 1,
            ParallelPlan(world_size=1, dp=1, tp=1, pp=1, zero_stage=1, micro_batch_size=8,
                         grad_accum_steps=2, global_batch_size=16),
            id="single-rank-accumulates",
        ),
        pytest.param(
            [], 2,
            ParallelPlan(world_size=2, dp=2, tp=1, pp=1, zero_stage=1, micro_batch_size=8,
                         grad_accum_steps=1, global_batch_size=16),
            id="dp-derived-from-world",
        ),
        pytest.param(
            ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
             "parallel.pp_microbatches=16", "train.micro_batch_size=2",
             "train.global_batch_size=64", "model.tie_embeddings=false"], 8,
            ParallelPlan(world_size=8, dp=2, tp=2, pp=2, zero_stage=1, micro_batch_size=2,
                         grad_accum_steps=16, global_batch_size=64, sequence_parallel=True),
            id="dp-is-what-tp-pp-leave",
        ),
        pytest.param(
            ["parallel.dp=4", "train.grad_accum_steps=2", "train.micro_batch_size=2",
             "parallel.zero_stage=3", "parallel.offload_params=true"], 4,
            ParallelPlan(world_size=4, dp=4, tp=1, pp=1, zero_stage=3, micro_batch_size=2,
                         grad_accum_steps=2, global_batch_size=16),
            id="explicit-dp-and-accum-that-match",
        ),
    ],
)
def test_good_config_resolves_the_plan(
    overrides: List[str], world_size: int, plan: ParallelPlan
) -> None:
    assert validate(load_config(BASE + overrides), world_size) == plan


def test_plan_describes_itself() -> None:
    plan = validate(load_config(BASE + ["parallel.tp=2"]), world_size=4)
    assert plan.describe() == (
        "world 4 = dp 2 x tp 2 x pp 1, ZeRO-1, global batch 16 = micro 8 x accumulation 1 x dp 2"
    )


# (experiment, its model, a world size it is meant for, the data-parallel size and accumulation)
EXPERIMENT_SCALES = [("tiny", "tiny", 1, 1, 2), ("125m", "125m", 8, 8, 4), ("1b", "1b", 8, 8, 16),
                     ("1_3b", "1_3b", 8, 8, 4),
                     ("7b", "7b", 8, 8, 128), ("13b", "13b", 16, 8, 128), ("70b", "70b", 64, 2, 512),
                     ("continued_smollm2", "smollm2_135m", 2, 2, 1), ("mlm_tiny", "tiny", 2, 2, 1),
                     ("sft_tiny", "tiny", 2, 2, 1), ("sft_smollm2", "smollm2_135m", 2, 2, 1),
                     ("dpo_tiny", "tiny", 2, 2, 2)]


@pytest.mark.parametrize(("experiment", "model", "world_size", "dp", "accum"), EXPERIMENT_SCALES)
def test_shipped_experiments_validate(
    experiment: str, model: str, world_size: int, dp: int, accum: int, tmp_path
) -> None:
    cfg = load_config([f"+exp={experiment}"])
    if cfg.data.pairs:  # validate reads the pairs folder, which `make dpo-tiny` prepares
        (tmp_path / "dataset.json").write_text('{"kind": "preference_pairs", "documents": 1}')
        cfg.data.pairs = str(tmp_path)
    assert (cfg.name, cfg.model.name) == (experiment, model)
    plan = validate(cfg, world_size)
    assert (plan.dp, plan.grad_accum_steps) == (dp, accum)


def test_every_experiment_is_covered() -> None:
    shipped = sorted(path.stem for path in (REPO_ROOT / "conf" / "exp").glob("*.yaml"))
    assert shipped == sorted(experiment for experiment, *_ in EXPERIMENT_SCALES)


def test_fast_paths_are_on_with_cuda_where_they_apply(monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["llmscale.config.validate"], "on_cuda", lambda: True)
    plan = validate(load_config(BASE), 1)
    assert (plan.compile, plan.fused_loss, plan.fused_optimizer) == (True, True, True)
    assert "compiled layers, fused loss, fused AdamW" in plan.describe()
    tensor_parallel = validate(load_config(BASE + ["parallel.tp=2"]), 2)
    assert (tensor_parallel.compile, tensor_parallel.fused_loss) == (False, False)
    assert not validate(load_config(BASE + ["parallel.zero_stage=3"]), 1).compile
    assert not validate(load_config(BASE + ["model=moe_tiny"]), 1).compile
    assert not validate(load_config(BASE + ["data.document_attention=true"]), 1).compile
    switched_off = validate(load_config(
        BASE + ["train.compile=false", "train.fused_loss=false", "optim.fused=false"]), 1)
    assert (switched_off.compile, switched_off.fused_loss, switched_off.fused_optimizer) == (
        False, False, False)


def test_fast_paths_are_off_on_a_cpu_unless_asked_for() -> None:
    plan = validate(load_config(BASE), 1)
    assert (plan.compile, plan.fused_loss, plan.fused_optimizer) == (False, False, False)
    asked = validate(load_config(BASE + ["train.compile=true", "train.fused_loss=true",
                                         "optim.fused=true"]), 1)
    assert (asked.compile, asked.fused_loss, asked.fused_optimizer) == (True, True, True)


def test_fast_paths_that_do_not_apply_are_refused() -> None:
    message = config_error(["parallel.tp=2", "train.compile=true", "train.fused_loss=true"], 2)
    assert "train.compile=true with parallel.tp=2" in message
    assert "set train.compile=false" in message
    assert "train.fused_loss=true with parallel.tp=2" in message
    message = config_error(["data.document_attention=true", "train.compile=true"], 1)
    assert "train.compile=true with data.document_attention=true" in message
    assert "set train.compile=false or data.document_attention=false" in message
