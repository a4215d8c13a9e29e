"""Supervised fine-tuning through the real launcher, on the bundled chat examples: two ranks
(ZeRO-2 and 3; tensor parallel with sequence parallelism; two pipeline stages) train and
validate as one process does, and a run resumed from a checkpoint continues the uninterrupted
one exactly.

The global batch of 4 is one micro-batch in one process, 2 ranks x 2 accumulated micro-batches
of 1 at ZeRO-2 and 3, 2 accumulated micro-batches of 2 under tensor parallelism, and 4
micro-batches of 1 through the pipeline; the examples' trained-on tokens differ (19 to 55 each),
so the runs agree only if every target of the global batch weighs the same
(llmscale.parallel.token_mean), not each micro-batch. The held-out loss is averaged the same
way."""

import pytest
from launching import REPO_ROOT, launch, metrics

from llmscale.data import ByteTokenizer
from llmscale.prep.chat import find_chat_template
from llmscale.prep.chat_dataset import write_chat_dataset

STEPS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """The five examples twice: six to train on, four held out (a global batch)."""
    folder = tmp_path_factory.mktemp("sft_tiny")
    examples = REPO_ROOT / "data" / "chat" / "example.jsonl"
    write_chat_dataset([examples, examples], folder, ByteTokenizer(),
                       find_chat_template(None, None), warn=lambda _: None)
    return [f"data.chat={folder}", "data.paths=[]", "data.seq_len=256", "data.val_fraction=0.4",
            f"train.max_steps={STEPS}", "train.global_batch_size=4",
            "train.eval_batches=1", f"train.eval_interval={STEPS}",
            "checkpoint.save_final=false", "optim.warmup_steps=1",
            "model.tie_embeddings=false"]  # the pipeline's first and last stages differ


@pytest.fixture(scope="module")
def reference(common, tmp_path_factory):
    """One process, the global batch in one micro-batch, uninterrupted, saving at step 2 for the
    resume test."""
    run_dir = tmp_path_factory.mktemp("one-process")
    stdout = launch("python", run_dir, *common, "train.micro_batch_size=4",
                    "checkpoint.interval=2")
    assert "chat data: training split 6 examples in 6 samples" in stdout
    return run_dir


def assert_same_losses(run_dir, reference) -> None:
    for name, steps in (("loss", range(1, STEPS + 1)), ("val_loss", [0, STEPS])):
        losses, expected = metrics(run_dir, name), metrics(reference, name)
        assert sorted(losses) == sorted(expected) == list(steps), name
        for step in expected:
            assert abs(losses[step] - expected[step]) / expected[step] < 1e-5, (
                name, step, losses[step], expected[step])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_on_two_ranks_matches_one_process(zero_stage, common, reference, tmp_path):
    losses = metrics(reference, "loss")
    assert losses[STEPS] < losses[1]
    launch("torchrun", tmp_path, *common, "train.micro_batch_size=1",
           f"parallel.zero_stage={zero_stage}")
    assert_same_losses(tmp_path, reference)


def test_tensor_and_sequence_parallel_match_one_process(common, reference, tmp_path):
    """Megatron's vocabulary-parallel cross-entropy takes the same denominator."""
    launch("torchrun", tmp_path, *common, "train.micro_batch_size=2", "parallel.tp=2",
           "parallel.sequence_parallel=true")
    assert_same_losses(tmp_path, reference)


def test_pipeline_stages_match_one_process(common, reference, tmp_path):
    """The denominator travels with the labels to the last stage."""
    launch("torchrun", tmp_path, *common, "train.micro_batch_size=1", "parallel.pp=2")
    assert_same_losses(tmp_path, reference)


def test_resumed_run_equals_the_uninterrupted_one(common, reference, tmp_path):
    """From the reference's step-2 checkpoint (saved as a stopped run saves): the same steps 3
    and 4, bit for bit."""
    stdout = launch("python", tmp_path, *common, "train.micro_batch_size=4",
                    f"train.resume={reference / 'checkpoints' / 'step_00000002'}")
    assert "resuming from" in stdout
    resumed, expected = metrics(tmp_path, "loss"), metrics(reference, "loss")
    assert sorted(resumed) == [3, 4]
    assert [resumed[3], resumed[4]] == [expected[3], expected[4]]
