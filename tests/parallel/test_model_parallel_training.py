"""Tensor, sequence, pipeline and expert parallelism through the real launcher, 2-8 CPU ranks,
against one process on the same global batch: every plan must learn exactly what one process
learns (the tie is off: a pipeline cannot tie the two ends of the model)."""

import pytest
from launching import launch, metrics

STEPS = 10
DENSE = ["model.tie_embeddings=false"]
MOE = ["model=moe_tiny", "model.tie_embeddings=false"]
COMMON = [f"train.max_steps={STEPS}", "checkpoint.interval=0", "checkpoint.save_final=false"]

pytestmark = pytest.mark.slow


def reference_losses(run_dir, model):
    launch("python", run_dir, *COMMON, *model)
    return metrics(run_dir, "loss")


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory) -> dict:
    return reference_losses(tmp_path_factory.mktemp("dense"), DENSE)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory) -> dict:
    return reference_losses(tmp_path_factory.mktemp("moe"), MOE)


def assert_same_curve(run_dir, reference: dict) -> None:
    losses = metrics(run_dir, "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, expected in reference.items():
        assert abs(losses[step] - expected) / abs(expected) < 1e-5, (step, losses[step], expected)
    assert losses[STEPS] < losses[1] - 0.5


@pytest.mark.parametrize(("ranks", "plan"), [
    pytest.param(2, ["parallel.tp=2"], id="tp2"),
    pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=true"], id="tp2-sp"),
    pytest.param(2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                     "parallel.activation_checkpointing=full"], id="tp2-sp-full-recompute"),
    # Row-parallel layers all-reduce in place: a recompute must not reduce again.
    pytest.param(2, ["parallel.tp=2", "parallel.activation_checkpointing=selective"],
                 id="tp2-selective-recompute"),
    pytest.param(2, ["parallel.pp=2"], id="pp2"),
    pytest.param(2, ["parallel.pp=2", "parallel.activation_checkpointing=selective"],
                 id="pp2-selective-recompute"),
    pytest.param(4, ["parallel.tp=2", "parallel.pp=2"], id="tp2-pp2"),
    pytest.param(4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
                 id="tp2-pp2-sp"),
    pytest.param(4, ["parallel.tp=2", "parallel.zero_stage=1"], id="dp2-tp2-zero1"),
    pytest.param(4, ["parallel.tp=2", "parallel.zero_stage=1", "parallel.sequence_parallel=true"],
                 id="dp2-tp2-sp-zero1"),
    pytest.param(8, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"],
                 id="dp2-pp2-tp2-sp"),
])
def test_model_parallel_plan_matches_one_process(ranks, plan, dense_reference, tmp_path):
    stdout = launch("torchrun", tmp_path, *COMMON, *DENSE, *plan, ranks=ranks)
    assert_same_curve(tmp_path, dense_reference)
    assert "tp 2" in stdout or "pp 2" in stdout


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_expert_parallel_matches_one_process(zero_stage, moe_reference, tmp_path):
    launch("torchrun", tmp_path, *COMMON, *MOE, "parallel.ep=2",
           f"parallel.zero_stage={zero_stage}")
    assert_same_curve(tmp_path, moe_reference)
    dropped = metrics(tmp_path, "moe_dropped_fraction")
    load = metrics(tmp_path, "moe_expert_load_max")
    assert set(dropped) == set(load) == set(range(1, STEPS + 1))
    assert all(0.0 <= value < 1.0 for value in dropped.values())
    assert all(1.0 <= value <= 4.0 for value in load.values())  # 4 experts at most
