"""Whole runs through the real launchers, 1 and 2 CPU ranks: data parallelism and resume must not
change what is learned."""

import pytest
from launching import launch, metric_lines, metrics

STEPS = 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single")
    launch("python", run_dir, f"train.max_steps={STEPS}", "checkpoint.interval=0",
           "checkpoint.save_final=false")
    return metrics(run_dir, "loss")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_two_ranks_match_one_process(zero_stage, single_process_losses, tmp_path):
    """Same global batch of 16: 1 process accumulates 2 micro-batches, 2 ranks take one each."""
    launch("torchrun", tmp_path, f"train.max_steps={STEPS}", f"parallel.zero_stage={zero_stage}",
           "checkpoint.interval=0", "checkpoint.save_final=false")
    losses = metrics(tmp_path, "loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, reference in single_process_losses.items():
        assert abs(losses[step] - reference) / abs(reference) < 1e-5, (step, losses[step], reference)
    assert losses[STEPS] < losses[1] - 0.5


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_stop_and_resume_equals_uninterrupted_run(zero_stage, tmp_path):
    common = [f"train.max_steps={STEPS}", f"parallel.zero_stage={zero_stage}",
              "checkpoint.interval=4"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    launch("torchrun", uninterrupted, *common)
    launch("torchrun", interrupted, *common, "train.exit_at_step=6")
    assert max(metrics(interrupted, "loss")) == 6
    lines_before_resume = metric_lines(interrupted)
    # Like Megatron's --exit-interval, stopping early saves a final checkpoint.
    stdout = launch("torchrun", interrupted, *common)
    assert "resuming from" in stdout and "step_00000006" in stdout
    expected = metrics(uninterrupted, "loss")
    resumed = metrics(interrupted, "loss", skip_lines=lines_before_resume)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert resumed[step] == expected[step], step
    assert metrics(interrupted, "val_loss")[STEPS] == metrics(uninterrupted, "val_loss")[STEPS]


def test_demo_run_learns_and_says_where_it_wrote(tmp_path):
    """The README's demo: the DeepSpeed launcher, 2 ranks, the tiny experiment's full length."""
    stdout = launch("deepspeed", tmp_path)
    val_ppl = metrics(tmp_path, "val_ppl")
    assert max(val_ppl) >= 200
    assert val_ppl[0] / val_ppl[max(val_ppl)] >= 3.0, val_ppl
    for line in (f"run folder:  {tmp_path}", f"metrics:     {tmp_path / 'metrics.jsonl'}",
                 f"checkpoint:  {tmp_path / 'checkpoints'}"):
        assert line in stdout
    assert (tmp_path / "config.yaml").is_file()
