"""Masked-LM training through the real launcher: the encoder learns (its masked-token accuracy
rises), and 2 ranks at ZeRO-2 and at tp=2 log the losses one process does, since every
sample's masks follow from its position in the global order."""

import pytest
from launching import launch, metrics

STEPS, COMPARED = 40, 3
MLM = ["objective=mlm", "model.causal=false", f"train.max_steps={STEPS}",
       f"train.eval_interval={STEPS}", "train.eval_batches=2", "checkpoint.interval=0",
       "checkpoint.save_final=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process")
    launch("python", run_dir, *MLM)
    return run_dir


def test_masked_token_accuracy_rises(reference):
    accuracy = metrics(reference, "val_masked_accuracy")
    assert sorted(accuracy) == [0, STEPS]
    assert accuracy[STEPS] > accuracy[0] + 0.05, accuracy


@pytest.mark.parametrize("plan", [["parallel.zero_stage=2"],
                                  ["parallel.tp=2", "parallel.sequence_parallel=true"]],
                         ids=["zero2", "tp2-sp"])
def test_two_ranks_match_one_process(reference, plan, tmp_path):
    launch("torchrun", tmp_path, *MLM, *plan, f"train.exit_at_step={COMPARED}")
    losses, expected = metrics(tmp_path, "loss"), metrics(reference, "loss")
    assert sorted(losses) == list(range(1, COMPARED + 1))
    for step in losses:
        assert abs(losses[step] - expected[step]) / expected[step] < 1e-5, (
            step, losses[step], expected[step])
